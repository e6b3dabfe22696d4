"""The demo's judge: does an image show what its caption says?

Each image is classified by the shapes generator's own classifier (`shapes.classify`, from pixels alone) and
compared with the ground-truth attributes of its caption: colour, shape, position (row and column), background,
and all four at once. Chance is the score of a model that ignores the caption (uniform over each attribute's
values; all four: their product).

The ceiling table scores the same held-out captions three ways, so a low score can be placed:

    real        the rendered images themselves: the judge's own ceiling (a weak judge shows here)
    tokenizer   the same images after the image tokenizer's encode -> decode: the most a model can reach
    generated   the model's images for the captions
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from t2i_ds.data.images import to_uint8
from t2i_ds.data.tokenizers import ImageTokenizer
from t2i_ds.demo import shapes
from t2i_ds.demo.shapes import ShapeAttributes
from t2i_ds.demo.tokenizer import to_tensor

ATTRIBUTES = ("color", "shape", "position", "background")
CHANCE = {
    "color": 1 / len(shapes.COLORS),
    "shape": 1 / len(shapes.SHAPES),
    "position": 1 / (len(shapes.ROWS) * len(shapes.COLS)),
    "background": 1 / len(shapes.BACKGROUNDS),
}
CHANCE["all"] = float(np.prod(list(CHANCE.values())))
ROWS = ("real", "tokenizer", "generated", "chance")


def verdict(found: ShapeAttributes, truth: ShapeAttributes) -> dict[str, bool]:
    """Per attribute (and `all`): does the classified image agree with its caption?"""
    right = {
        "color": found.color == truth.color,
        "shape": found.shape == truth.shape,
        "position": (found.row, found.col) == (truth.row, truth.col),
        "background": found.background == truth.background,
    }
    return {**right, "all": all(right.values())}


def verdicts(images: np.ndarray, attributes: Sequence[ShapeAttributes]) -> list[dict[str, bool]]:
    """(N, H, W, 3) uint8 images and their captions' attributes -> one verdict per image."""
    if len(images) != len(attributes) or len(images) == 0:
        raise ValueError(f"need as many attributes as images (> 0), got {len(attributes)} and {len(images)}")
    return [verdict(shapes.classify(image), truth) for image, truth in zip(images, attributes)]


def summarise(per_image: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Fraction right per attribute and for all four."""
    return {k: float(np.mean([v[k] for v in per_image])) for k in (*ATTRIBUTES, "all")}


def consistency_score(images: np.ndarray, attributes: Sequence[ShapeAttributes]) -> dict[str, float]:
    """Match fractions (color, shape, position, background, all), n, and chance_<attribute> for each of the four."""
    return {**summarise(verdicts(images, attributes)), "n": len(images),
            **{f"chance_{k}": CHANCE[k] for k in ATTRIBUTES}}


def round_trip(tokenizer: ImageTokenizer, images: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> the same images after the tokenizer's encode -> decode, (N, S, S, 3) uint8."""
    return to_uint8(tokenizer.decode(tokenizer.encode(to_tensor(images))))


def ceiling_table(real: np.ndarray, tokenizer: ImageTokenizer, generated: np.ndarray,
                  attributes: Sequence[ShapeAttributes]) -> dict[str, dict[str, float]]:
    """The ROWS of the module docstring, each {attribute: fraction right}, for the same captions' images."""
    return {
        "real": summarise(verdicts(real, attributes)),
        "tokenizer": summarise(verdicts(round_trip(tokenizer, real), attributes)),
        "generated": summarise(verdicts(generated, attributes)),
        "chance": dict(CHANCE),
    }


def format_table(table: dict[str, dict[str, float]]) -> list[str]:
    """The ceiling table as aligned text lines (one header, one line per row)."""
    columns = (*ATTRIBUTES, "all")
    lines = [f"  {'':10s}" + "".join(f"{c:>12s}" for c in columns)]
    return lines + [f"  {row:10s}" + "".join(f"{table[row][c]:12.3f}" for c in columns) for row in ROWS if row in table]
