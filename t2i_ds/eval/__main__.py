"""`python -m t2i_ds.eval`: evaluation commands.

    python -m t2i_ds.eval fid --run RUN_DIR --captions coco30k.txt --reference val2014/ \
        --inception inception-2015-12-05.pt --out runs/fid [--n 30000 --cfg_scale 3 --top_k 1000 --seed 0]

`fid`: COCO FID of a run's samples, the GigaGAN / clean-fid protocol (t2i_ds.eval.fid describes it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from t2i_ds.eval import fid


def load_run(run_dir, checkpoint: str | None, device: str):
    """inference.load_run, imported lazily (DeepSpeed is heavy); tests replace this function."""
    from t2i_ds.inference import load_run as _load_run

    return _load_run(run_dir, checkpoint, device=device)


def fid_main(args) -> int:
    """`python -m t2i_ds.eval fid ...`: check inputs, load, evaluate, print."""
    for path, what in ((args.captions, "captions file"), (args.run, "run directory")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
    if not Path(args.reference).exists():
        raise FileNotFoundError(f"reference {args.reference} does not exist (an image folder or an .npz)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = fid.TorchScriptExtractor(args.inception, device)  # before the model: a bad path fails in seconds
    run = load_run(args.run, args.checkpoint, device)
    report = fid.evaluate_fid(run, args.captions, args.reference, extractor, args.out, n=args.n, cfg_scale=args.cfg_scale,
                          top_k=args.top_k or None, temperature=args.temperature, seed=args.seed,
                          batch_size=args.batch_size, resize=args.resize or None, save_images=args.save_images,
                          workers=args.workers, run_dir=args.run, checkpoint=args.checkpoint)
    print(json.dumps(report, indent=2))
    return 0


def add_fid_arguments(p) -> None:
    """The `fid` subcommand's flags (an argparse parser)."""
    p.add_argument("--run", required=True, help="run directory of a trained model (newest complete checkpoint)")
    p.add_argument("--checkpoint", default=None, help="e.g. step_00095000 (default: the newest complete one)")
    p.add_argument("--captions", required=True, help=".txt (one caption a line) or .jsonl ('caption' key)")
    p.add_argument("--reference", required=True, help="reference image folder (e.g. COCO val2014) or an .npz of its stats")
    p.add_argument("--inception", required=True, help="local inception-2015-12-05.pt (TorchScript; never downloaded)")
    p.add_argument("--out", required=True, help="directory: fid.jsonl, reference_stats/, images/")
    p.add_argument("--n", type=int, default=30_000, help="first n captions (0: all)")
    p.add_argument("--cfg_scale", type=float, default=3.0)
    p.add_argument("--top_k", type=int, default=1000, help="0: no top-k")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--resize", type=int, default=256, help="GigaGAN eval_res: LANCZOS to this size first (0: none)")
    p.add_argument("--save_images", action="store_true", help="write out/images/{caption index:06d}.png")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading reference images")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_fid_arguments(sub.add_parser("fid", help="FID of a run's samples against reference images (clean-fid protocol)",
                                     description=fid.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return fid_main(args)


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.eval", main)
