"""Evaluation of generated images: the demo score (does the image show what the caption says?) and FID.

`consistency_score` classifies each generated image with the shapes generator's own classifier
(t2i_ds.data.shapes.classify) and compares with the ground-truth attributes of its caption. Chance
levels are those of a model that ignores the caption (uniform over the attribute's values).

FID (COCO-30K, the GigaGAN / clean-fid protocol) lives in t2i_ds.eval_fid; its command is

    python -m t2i_ds.evaluate fid --run RUN_DIR --captions coco30k.txt --reference val2014/ \
        --inception inception-2015-12-05.pt --out runs/fid [--n 30000 --cfg_scale 3 --top_k 1000 --seed 0]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t2i_ds.data import shapes
from t2i_ds.data.shapes import ShapeAttributes

_CHANCE = {
    "color": 1 / len(shapes.COLORS),
    "shape": 1 / len(shapes.SHAPES),
    "position": 1 / (len(shapes.ROWS) * len(shapes.COLS)),
    "background": 1 / len(shapes.BACKGROUNDS),
}


def consistency_score(images: np.ndarray, attributes: Sequence[ShapeAttributes]) -> dict[str, float]:
    """(N, H, W, 3) uint8 images and their captions' attributes -> match fractions and chance levels.

    Keys: color, shape, position (row and column), background, all (every attribute), n, and
    chance_<attribute> for each of the four.
    """
    if len(images) != len(attributes) or len(images) == 0:
        raise ValueError(f"need as many attributes as images (> 0), got {len(attributes)} and {len(images)}")
    found = [shapes.classify(image) for image in images]
    match = {
        "color": [f.color == a.color for f, a in zip(found, attributes)],
        "shape": [f.shape == a.shape for f, a in zip(found, attributes)],
        "position": [(f.row, f.col) == (a.row, a.col) for f, a in zip(found, attributes)],
        "background": [f.background == a.background for f, a in zip(found, attributes)],
        "all": [f == a for f, a in zip(found, attributes)],
    }
    scores = {k: float(np.mean(v)) for k, v in match.items()}
    return {**scores, "n": len(images), **{f"chance_{k}": v for k, v in _CHANCE.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m t2i_ds.evaluate fid ...`: COCO FID of a run (t2i_ds.eval_fid describes the protocol)."""
    import argparse

    from t2i_ds import eval_fid

    p = argparse.ArgumentParser(prog="t2i_ds.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    eval_fid.add_fid_arguments(sub.add_parser("fid", help="FID of a run's samples against reference images (clean-fid protocol)",
                                              description=eval_fid.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    return eval_fid.fid_main(args)


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.evaluate", main)
