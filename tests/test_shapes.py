"""The synthetic captioned-shapes generator and its classifier (the demo's ground truth)."""

import numpy as np
import pytest

from t2i_ds.demo import shapes
from t2i_ds.demo import judge
from t2i_ds.demo.judge import consistency_score
from t2i_ds.demo.tokenizer import PatchKMeansTokenizer, to_tensor


@pytest.fixture(scope="module")
def samples():
    return shapes.generate(400, seed=0, size=32)


def test_generate_is_a_function_of_the_seed(samples):
    again = shapes.generate(400, seed=0, size=32)
    assert all(np.array_equal(a.image, b.image) and a.caption == b.caption for a, b in zip(samples, again))
    other = shapes.generate(400, seed=1, size=32)
    assert any(a.caption != b.caption for a, b in zip(samples, other))


def test_images_and_attributes(samples):
    s = samples[0]
    assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    for s in samples:
        a = s.attributes
        assert a.color in shapes.COLORS and a.shape in shapes.SHAPES and a.background in shapes.BACKGROUNDS
        colours = {tuple(p) for p in s.image.reshape(-1, 3)}
        assert colours == {shapes.COLORS[a.color], shapes.BACKGROUNDS[a.background]}  # two flat colours


def test_every_value_occurs(samples):
    for field, values in (("color", shapes.COLORS), ("shape", shapes.SHAPES), ("row", shapes.ROWS), ("col", shapes.COLS)):
        assert {getattr(s.attributes, field) for s in samples} == set(values)
    assert len({s.caption.split()[0] for s in samples}) > 5  # several templates in use


def test_caption_names_the_attributes(samples):
    for s in samples:
        a, text = s.attributes, s.caption.replace("-", " ")
        assert f" {a.color} " in f" {text} " and f" {a.shape}" in f" {text}" and a.position in text
        assert f"{a.background} background" in text  # every attribute the judge scores is stated
        assert set(s.caption.replace(",", " , ").replace(":", " : ").replace("-", " - ").split()) <= set(shapes.words())


def test_position_phrase():
    a = shapes.ShapeAttributes("red", "circle", "middle", "center", "white")
    assert a.position == "center"
    assert shapes.ShapeAttributes("red", "circle", "top", "left", "white").position == "top left"


def test_classify_recovers_the_attributes(samples):
    found = [shapes.classify(s.image) for s in samples]
    acc = {f: np.mean([getattr(p, f) == getattr(s.attributes, f) for p, s in zip(found, samples)])
           for f in ("color", "shape", "row", "col", "background")}
    print(acc)
    assert acc["color"] >= 0.98 and acc["background"] >= 0.98
    assert acc["row"] >= 0.98 and acc["col"] >= 0.98
    assert acc["shape"] >= 0.95


def test_classify_blank_and_recoloured():
    blank = np.full((32, 32, 3), shapes.BACKGROUNDS["gray"], dtype=np.uint8)
    assert shapes.classify(blank) == shapes.NO_SHAPE
    s = shapes.generate(1, seed=3)[0]
    image = s.image.copy()
    image[(image == shapes.COLORS[s.attributes.color]).all(-1)] = shapes.COLORS["blue" if s.attributes.color != "blue" else "red"]
    assert shapes.classify(image).color != s.attributes.color


def test_consistency_score(samples):
    images = np.stack([s.image for s in samples])
    attrs = [s.attributes for s in samples]
    right = consistency_score(images, attrs)
    assert right["color"] >= 0.98 and right["n"] == len(samples)
    assert right["chance_color"] == 1 / len(shapes.COLORS)
    shuffled = consistency_score(images, attrs[1:] + attrs[:1])  # captions of other images
    assert shuffled["color"] < 0.3 and shuffled["all"] < 0.05
    with pytest.raises(ValueError):
        consistency_score(images, attrs[:-1])


def test_verdict_per_attribute():
    truth = shapes.ShapeAttributes("red", "circle", "top", "left", "white")
    assert judge.verdict(truth, truth) == {"color": True, "shape": True, "position": True, "background": True, "all": True}
    wrong = judge.verdict(shapes.ShapeAttributes("red", "square", "top", "center", "white"), truth)
    assert wrong == {"color": True, "shape": False, "position": False, "background": True, "all": False}


def test_ceiling_table_places_the_loss(samples):
    """real >= 0.98 everywhere; a 16-code tokenizer loses shapes; images of other captions score near chance."""
    real, attrs = np.stack([s.image for s in samples[:100]]), [s.attributes for s in samples[:100]]
    coarse = PatchKMeansTokenizer.fit(to_tensor(real), codebook_size=16, patch=8, seed=0)
    table = judge.ceiling_table(real, coarse, np.roll(real, 1, axis=0), attrs)
    assert list(table) == list(judge.ROWS)
    assert min(table["real"].values()) >= 0.98, table["real"]
    assert table["tokenizer"]["shape"] < table["real"]["shape"] - 0.2, table["tokenizer"]
    assert table["generated"]["color"] < 0.3 and table["chance"]["all"] == pytest.approx(1 / (8 * 4 * 9 * 3))
    lines = judge.format_table(table)
    assert len(lines) == 5 and lines[1].split()[0] == "real" and "shape" in lines[0]
