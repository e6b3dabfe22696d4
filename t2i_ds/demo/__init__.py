"""The embedded demo: captioned shapes (shapes.py), their data set (data.py), a patch k-means image tokenizer
(tokenizer.py), the judge that scores images against their captions (judge.py), the `demo` run preset
(preset.py); `python -m t2i_ds.demo` runs it end to end (__main__.py).

Importing the package registers the patch k-means tokenizer as the image-tokenizer kind `demo` (`demo:DIR`), the
way t2i_ds.data.image_tokenizers registers MoVQGAN: the library finds it through the registry, never by name.
"""

from t2i_ds.data.image_tokenizers import register_image_tokenizer


def _load_patch_kmeans(path: str):
    from t2i_ds.demo.tokenizer import PatchKMeansTokenizer  # lazy: importing the package stays cheap

    return PatchKMeansTokenizer.load(path)


register_image_tokenizer("demo", _load_patch_kmeans)
