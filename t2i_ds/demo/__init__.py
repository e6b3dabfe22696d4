"""The embedded demo: captioned shapes (shapes.py), their data set (data.py), two image tokenizers (palette + binary
masks in mask_tokenizer.py, the default; patch k-means in tokenizer.py), the judge that scores images against their captions (judge.py), the `demo` run preset
(preset.py); `python -m t2i_ds.demo` runs it end to end (__main__.py).

Importing the package registers the patch k-means tokenizer as the image-tokenizer kind `demo` (`demo:DIR`) and the
palette-mask one as `demo_mask` (`demo_mask:DIR`), the way t2i_ds.data.image_tokenizers registers MoVQGAN: the library finds it through the registry, never by name.
"""

from t2i_ds.data.image_tokenizers import register_image_tokenizer


def _load_patch_kmeans(path: str):
    from t2i_ds.demo.tokenizer import PatchKMeansTokenizer  # lazy: importing the package stays cheap

    return PatchKMeansTokenizer.load(path)


def _load_palette_mask(path: str):
    from t2i_ds.demo.mask_tokenizer import PaletteMaskTokenizer

    return PaletteMaskTokenizer.load(path)


register_image_tokenizer("demo", _load_patch_kmeans)
register_image_tokenizer("demo_mask", _load_palette_mask)
