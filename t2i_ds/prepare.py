"""`python -m t2i_ds.prepare`: image-caption pairs -> token shards, once, resumably (t2i_ds.data.prepare, docs/data.md).

    python -m t2i_ds.prepare --input /data/cc3m/{00000..00331}.tar --out /data/cc3m-tokens \
        --image-tokenizer movqgan:models/movqgan-67m
"""

from __future__ import annotations

import argparse
import logging
import os

import t2i_ds.demo  # noqa: F401  (registers the demo's image tokenizer kind, demo:DIR)
from t2i_ds.cli import non_negative_int, positive_int
from t2i_ds.data.image_tokenizers import parse_image_tokenizer_spec
from t2i_ds.data.images import SMALL_POLICIES
from t2i_ds.data.prepare import run
from t2i_ds.data.shards import length_summary
from t2i_ds.vocab import Vocab


def print_summary(manifest: dict, max_caption_tokens: int) -> None:
    images_this_run, seconds = manifest["this_run"]["images"], manifest["this_run"]["seconds"]
    stats = manifest["stats"]
    hist = {int(k): v for k, v in stats["caption_length_histogram"].items()}
    over = sum(v for k, v in hist.items() if k > max_caption_tokens)
    print(f"this run: {images_this_run} images in {seconds:.1f} s ({images_this_run / max(seconds, 1e-9):.1f} images/s)")
    print(f"shards: {len(manifest['shards'])}, samples written: {stats['samples']}")
    print(f"skipped: {stats['skipped'] or 'none'}; empty captions (kept): {stats['empty_captions']}")
    if manifest["skipped_list"]["records"]:
        print(f"skipped records (key, reason, source): {manifest['skipped_list']['path']}")
    print(f"caption tokens: {length_summary(hist) or 'n/a'}")
    print(f"captions longer than {max_caption_tokens} tokens (truncated in training): {over}")


def image_tokenizer_spec(text: str) -> str:
    try:
        parse_image_tokenizer_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i_ds.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="img2dataset tars (dir/glob/brace), an image folder, or a CSV/parquet")
    p.add_argument("--out", required=True, help="output directory of token shards")
    p.add_argument("--image-tokenizer", required=True, type=image_tokenizer_spec, help="movqgan:DIR (diffusers VQModel) or demo:DIR")
    p.add_argument("--text-tokenizer", default=None, help="tokenizer.json or HF directory (default: NeoX BPE in the repo)")
    p.add_argument("--image-size", type=positive_int, default=256, help="center-crop and resize to this many pixels")
    p.add_argument("--small-images", choices=SMALL_POLICIES, default="upscale", help="images smaller than the crop")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per image-tokenizer call")
    p.add_argument("--decode-workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000, help="folder/CSV inputs: pairs per output shard")
    p.add_argument("--prefix", default="tokens", help="output shard name prefix")
    p.add_argument("--image-col", default="image", help="CSV/parquet column of image paths")
    p.add_argument("--caption-col", default="caption", help="CSV/parquet column of captions")
    p.add_argument("--max-caption-tokens", type=non_negative_int, default=Vocab().max_caption_tokens, help="for the summary only")
    p.add_argument("--rank", type=non_negative_int, default=None, help="this process's rank (default: env RANK)")
    p.add_argument("--world-size", type=positive_int, default=None, help="number of processes (default: env WORLD_SIZE)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    manifest = run(args)
    print_summary(manifest, args.max_caption_tokens)
    return manifest


if __name__ == "__main__":
    from t2i_ds.cli import run as run_command

    run_command("t2i_ds.prepare", main)
