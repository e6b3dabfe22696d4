"""The embedded demo: captioned shapes (shapes.py), their data set (data.py), a patch k-means image tokenizer
(tokenizer.py), the `demo` run preset (preset.py); `python -m t2i_ds.demo` runs it end to end (__main__.py)."""
