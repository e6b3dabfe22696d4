"""`python -m t2i_ds.prepare`: image-caption pairs -> token shards (see t2i_ds/data/prepare.py, docs/data.md)."""

from t2i_ds.data.prepare import main

if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.prepare", main)
