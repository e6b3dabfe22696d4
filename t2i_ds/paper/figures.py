"""`python -m t2i_ds.paper.figures`: the paper's figures (3, 4, 6, 7) as PNGs from TensorBoard runs.

    python -m t2i_ds.paper.figures --runs pretrained=runs/t2i_pretrained random=runs/t2i_random --out figs
    python -m t2i_ds.paper.figures --runs full=runs/uncond_full embed_output=runs/uncond_embed_output \
        --figures fig6 --out figs/uncond
    python -m t2i_ds.paper.figures --runs align=runs/align --figures fig7 --x step --out figs/align
"""

from __future__ import annotations

import argparse
from pathlib import Path

from t2i_ds.paper.curves import FIGURES, load_curves, make_figures


def parse_run(spec: str) -> tuple[str, str]:
    """`NAME=RUN_DIR` -> (name, dir)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR, got {spec!r}")
    return name, path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m t2i_ds.paper.figures", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=parse_run, default=[], metavar="NAME=RUN_DIR", help="runs to compare")
    p.add_argument("--out", required=True, help="output directory of the PNGs")
    p.add_argument("--figures", nargs="+", choices=list(FIGURES), default=list(FIGURES), help="figures to draw")
    p.add_argument("--ema", type=float, default=0.95, help="EMA smoothing (paper: 0.95); 0 draws raw curves only")
    p.add_argument("--x", choices=("tokens", "step"), default="tokens", help="x axis (fig7 always uses the step)")
    return p.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    if not args.runs:
        raise SystemExit("figures: no runs given; pass --runs NAME=RUN_DIR [NAME=RUN_DIR ...]")
    names = [name for name, _ in args.runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"figures: run names must be distinct, got {names}")
    runs = {name: load_curves(path) for name, path in args.runs}
    paths = make_figures(runs, args.out, args.figures, args.ema, args.x)
    for path in paths:
        print(f"figures: wrote {path}")
    return paths


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.paper.figures", main)
