"""`python -m t2i_ds.convert_movqgan`: an original SBER MoVQGAN checkpoint -> a diffusers VQModel directory.

    python -m t2i_ds.convert_movqgan --ckpt movqgan_67M.ckpt --out models/movqgan-67m --size 67M
"""

from __future__ import annotations

import argparse

from t2i_ds.data.movqgan import MOVQGAN_CONFIGS, load_sber_movqgan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.convert_movqgan", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="original SBER checkpoint, e.g. movqgan_67M.ckpt")
    p.add_argument("--out", required=True, help="output directory (VQModel.save_pretrained)")
    p.add_argument("--size", required=True, choices=sorted(MOVQGAN_CONFIGS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_sber_movqgan(args.ckpt, args.size)
    model.save_pretrained(args.out)
    print(f"wrote MoVQGAN-{args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) to {args.out}")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.convert_movqgan", main)
