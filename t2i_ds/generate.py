"""`python -m t2i_ds.generate`: sample images for captions from a trained run: a PNG grid, or one PNG per caption.

    python -m t2i_ds.generate --checkpoint RUN_DIR --captions "a red circle ..." --cfg_scale 3 --out grid.png
    deepspeed --num_gpus 8 --module t2i_ds.generate --checkpoint RUN_DIR --captions_file coco30k.jsonl \\
        --out_dir samples/ --cfg_scale 3 --top_k 1000 --seed 0

--out_dir writes `{caption index:06d}.png` for every caption (line i of --captions_file is caption index i),
sharded over the launcher's ranks (RANK / WORLD_SIZE, as deepspeed and torchrun set them; one process: all of
them), skipping images already written: kill it and rerun, at any number of ranks, and the folder ends up with
the same files byte for byte (t2i_ds.eval.generation). Sampling (KV cache, batched classifier-free guidance,
top-k, keyed by caption index) is t2i_ds.sampling.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int, top_k
from t2i_ds.data.images import to_uint8
from t2i_ds.sampling import generate_images, save_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory of a trained model")
    p.add_argument("--captions", nargs="*", default=[], help="captions to draw")
    p.add_argument("--captions_file", help="one caption per line (.txt) or a 'caption' per JSON line (.jsonl)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="PNG grid to write")
    out.add_argument("--out_dir", help="folder of {caption index:06d}.png, sharded over ranks, resumable")
    p.add_argument("--cfg_scale", type=non_negative_float, default=0.0, help="classifier-free guidance (>= 0; 0: none)")
    p.add_argument("--top_k", type=top_k, default=None, help="sample among the k likeliest codes (>= 1; none: all)")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--nrow", type=positive_int, default=8)
    p.add_argument("--indices", type=non_negative_int, nargs="*", default=None,
                   help="only these caption indices (line numbers of --captions_file, from 0), keyed as in the full list")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on a GPU)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    return p.parse_args(argv)


def read_captions(args) -> list[str]:
    from t2i_ds.eval.generation import read_captions as read_file

    captions = list(args.captions)
    if args.captions_file:
        path = Path(args.captions_file)
        if path.suffix == ".jsonl":
            captions += read_file(path, None)
        else:
            captions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not captions:
        raise ValueError("no captions: pass --captions or --captions_file")
    return captions


def check_indices(indices: Sequence[int], n: int) -> None:
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"--indices {bad} outside the {n} captions")


def main(argv: Sequence[str] | None = None) -> None:
    """Load a run, tokenise the captions, sample, decode, write a grid or one PNG per caption."""
    import torch

    from t2i_ds.inference import load_run  # lazy: DeepSpeed is heavy

    args = parse_args(argv)
    captions = read_captions(args)
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.backends.cudnn.benchmark = False  # the same convolution algorithms every run: identical pixels
    run = load_run(args.checkpoint, device=device)  # .model, .vocab, .text_tokenizer, .image_tokenizer
    if run.image_tokenizer is None:
        raise ValueError(f"{args.checkpoint}: the run's config names no train.image_tokenizer to decode with")
    if args.out_dir:
        from t2i_ds.eval.generation import generate_folder, launcher_rank

        rank, world = launcher_rank()
        summary = generate_folder(run, captions, args.out_dir, cfg_scale=args.cfg_scale, top_k=args.top_k,
                                  temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                                  rank=rank, world=world, compile=args.compile, only=args.indices,
                                  describe={"run": str(Path(args.checkpoint).resolve()), "checkpoint": "newest complete"})
        print(f"rank {rank}/{world}: wrote {summary['generated']} of its {summary['captions']} images to {args.out_dir}")
        return
    indices = args.indices if args.indices is not None else list(range(len(captions)))
    check_indices(indices, len(captions))
    captions = [captions[i] for i in indices]
    ids = run.text_tokenizer.encode_batch(captions)
    codes = generate_images(
        run.model, run.vocab, ids, cfg_scale=args.cfg_scale, top_k=args.top_k, indices=indices,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size, compile=args.compile,
    )
    images = to_uint8(run.image_tokenizer.decode(codes.to(next(run.model.parameters()).device)))
    save_grid(images, args.out, nrow=args.nrow, captions=captions)
    print(f"wrote {len(captions)} images to {args.out}")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.generate", main)
