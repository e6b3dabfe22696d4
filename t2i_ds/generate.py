"""`python -m t2i_ds.generate`: sample images for captions from a trained run: a PNG grid, or one PNG per caption.

    python -m t2i_ds.generate --checkpoint RUN_DIR --captions "a red circle ..." --cfg_scale 3 --out grid.png
    deepspeed --num_gpus 8 --module t2i_ds.generate --checkpoint RUN_DIR --captions_file coco30k.jsonl \\
        --out_dir samples/ --cfg_scale 3 --top_k 1000 --seed 0

--out_dir writes `{caption index:06d}.png` for every caption (line i of --captions_file, from 0, is caption index i,
after the --captions: a blank .txt line is an empty caption; a .jsonl file with a malformed line is refused up front,
naming the file and every bad line; a caption longer than the format holds is truncated as in training, with a
warning naming its line),
sharded over the launcher's ranks (RANK / WORLD_SIZE, as deepspeed and torchrun set them; one process: all of
them), skipping images already written: kill it and rerun, at any number of ranks, and the folder ends up with
the same files byte for byte (t2i_ds.eval.generation). Sampling (KV cache, batched classifier-free guidance,
top-k, keyed by caption index) is t2i_ds.sampling.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import t2i_ds.demo  # noqa: F401  (registers the demo's image tokenizer kind, demo:DIR)
from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int, top_k
from t2i_ds.data.images import to_uint8
from t2i_ds.sampling import generate_images, save_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory of a trained model")
    p.add_argument("--captions", nargs="*", default=[], help="captions to draw")
    p.add_argument("--captions_file", help="line i is caption index i: one caption per line (.txt; a blank line is an "
                   "empty caption) or a JSON object with a 'caption' per line (.jsonl; a file with a bad line is refused, "
                   "every bad line named); a caption longer than the format holds (122 tokens of 1,152) is truncated as in "
                   "training, with a warning naming its line")
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


def read_captions(args, warn: Callable[[str], None] = print) -> tuple[list[str], Callable[[int], str]]:
    """The captions (--captions first, then every line of --captions_file: line i is caption index
    len(--captions) + i), and a function naming where caption index i came from. Blank .txt lines are empty
    captions, said in one warning line; a .jsonl file with a bad line is refused naming every bad line."""
    from t2i_ds.eval.generation import read_caption_file

    given = list(args.captions)
    from_file = read_caption_file(args.captions_file) if args.captions_file else []

    def where(i: int) -> str:
        if i < len(given):
            return f"--captions item {i}"
        return f"{args.captions_file} line {i - len(given) + 1} (caption index {i})"

    captions = given + from_file
    if not captions:
        raise ValueError("no captions: pass --captions or --captions_file")
    if args.captions_file and Path(args.captions_file).suffix != ".jsonl":
        blank = [i for i in range(len(given), len(captions)) if not captions[i]]
        if blank:
            warn(f"{_listed(blank, where)}: blank, drawn as empty captions (unconditional images)")
    return captions, where


def _listed(indices: Sequence[int], where: Callable[[int], str], most: int = 5) -> str:
    more = f" and {len(indices) - most} more" if len(indices) > most else ""
    return ", ".join(where(i) for i in indices[:most]) + more


def warn_long_captions(ids: Sequence[Sequence[int]], max_tokens: int, where: Callable[[int], str],
                       warn: Callable[[str], None] = print) -> list[int]:
    """One warning line for the captions longer than the format's caption room (they are truncated as in training:
    their first `max_tokens` tokens are the prompt); returns their indices."""
    long = [i for i, x in enumerate(ids) if len(x) > max_tokens]
    if long:
        warn(f"{_listed(long, lambda i: f'{where(i)} ({len(ids[i])} tokens)')}: longer than the {max_tokens} caption "
             f"tokens the sequence format holds, drawn from the first {max_tokens} (as training truncates them)")
    return long


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank reads the same captions: one says it
        print(f"t2i_ds.generate: warning: {message}", file=sys.stderr, flush=True)


def check_indices(indices: Sequence[int], n: int) -> None:
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"--indices {bad} outside the {n} captions")


def main(argv: Sequence[str] | None = None) -> None:
    """Load a run, tokenise the captions, sample, decode, write a grid or one PNG per caption."""
    import torch

    from t2i_ds.inference import load_run  # lazy: DeepSpeed is heavy

    args = parse_args(argv)
    captions, where = read_captions(args, warn=_warn)
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.backends.cudnn.benchmark = False  # the same convolution algorithms every run: identical pixels
    run = load_run(args.checkpoint, device=device)  # .model, .vocab, .text_tokenizer, .image_tokenizer
    if run.image_tokenizer is None:
        raise ValueError(f"{args.checkpoint}: the run's config names no train.image_tokenizer to decode with")
    warn_long_captions(run.text_tokenizer.encode_batch(captions), run.vocab.max_caption_tokens, where, warn=_warn)
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
