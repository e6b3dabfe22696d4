"""`python -m t2i_ds.generate`: sample images for captions from a trained run and write a PNG grid.

    python -m t2i_ds.generate --checkpoint RUN_DIR --captions "a red circle ..." --cfg_scale 3 --out grid.png

Sampling (KV cache, batched classifier-free guidance, top-k) is t2i_ds.sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from t2i_ds.data.images import to_uint8
from t2i_ds.sampling import generate_images, save_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory of a trained model")
    p.add_argument("--captions", nargs="*", default=[], help="captions to draw")
    p.add_argument("--captions_file", help="a text file with one caption per line")
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.add_argument("--cfg_scale", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nrow", type=int, default=8)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Load a run, tokenise the captions, sample, decode, write a grid."""
    from t2i_ds.inference import load_run  # lazy: DeepSpeed is heavy

    args = parse_args(argv)
    captions = list(args.captions)
    if args.captions_file:
        captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
    if not captions:
        raise SystemExit("no captions: pass --captions or --captions_file")
    run = load_run(args.checkpoint)  # .model, .vocab, .text_tokenizer, .image_tokenizer
    if run.image_tokenizer is None:
        raise SystemExit(f"{args.checkpoint}: the run's config names no train.image_tokenizer to decode with")
    ids = run.text_tokenizer.encode_batch(captions)
    codes = generate_images(
        run.model, run.vocab, ids, cfg_scale=args.cfg_scale, top_k=args.top_k,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
    )
    images = to_uint8(run.image_tokenizer.decode(codes.to(next(run.model.parameters()).device)))
    save_grid(images, args.out, nrow=args.nrow, captions=captions)
    print(f"wrote {len(captions)} images to {args.out}")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.generate", main)
