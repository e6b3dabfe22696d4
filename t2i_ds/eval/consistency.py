"""The demo's score: does a generated image show what its caption says?

`consistency_score` classifies each generated image with the shapes generator's own classifier
(t2i_ds.demo.shapes.classify) and compares with the ground-truth attributes of its caption. Chance
levels are those of a model that ignores the caption (uniform over the attribute's values).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t2i_ds.demo import shapes
from t2i_ds.demo.shapes import ShapeAttributes

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
