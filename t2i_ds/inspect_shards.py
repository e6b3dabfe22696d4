"""`python -m t2i_ds.inspect_shards`: decode token shards back to images and captions, to look at them.

    python -m t2i_ds.inspect_shards --shards /data/cc3m-tokens --image-tokenizer movqgan:models/movqgan-67m --out previews
"""

from __future__ import annotations

import argparse

import t2i_ds.demo  # noqa: F401  (registers the demo's image tokenizer kind, demo:DIR)
from t2i_ds.data.decode_shards import decode_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m t2i_ds.inspect_shards", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="token shard directory, glob or brace pattern")
    p.add_argument("--image-tokenizer", required=True, help="movqgan:DIR or demo:DIR (the one prepare used)")
    p.add_argument("--out", required=True, help="directory for {key}.png and {key}.txt")
    p.add_argument("--n", type=int, default=16, help="samples to decode")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = decode_shards(args.shards, args.image_tokenizer, args.out, args.n)
    print(f"decoded {len(paths)} samples to {args.out}")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.inspect_shards", main)
