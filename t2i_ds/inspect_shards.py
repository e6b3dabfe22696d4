"""`python -m t2i_ds.inspect_shards`: decode token shards back to images (see t2i_ds/data/decode_shards.py)."""

from t2i_ds.data.decode_shards import main

if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.inspect_shards", main)
