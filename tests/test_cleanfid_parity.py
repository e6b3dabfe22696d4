"""Our FID protocol against its reference implementation, clean-fid (installed by the Makefile with --no-deps into
<venv>/nodeps, outside site-packages (requirements/nodeps.in says why): `cleanfid.resize` imports without torchvision,
`cleanfid.fid` does not, so its Frechet distance is read from its source file and run as it is).

- resizing: clean-fid's `make_resizer("PIL", False, "bicubic", (299, 299))` ("clean" mode) and GigaGAN's uint8
  LANCZOS step (`make_resizer("PIL", True, "lanczos", (256, 256))`) give the same arrays, byte for byte, as ours
  on real photographs (the JPEGs that scikit-learn and matplotlib install: no image ships with this repository);
- the Frechet distance equals clean-fid's scipy `linalg.sqrtm` formula on the same statistics to 1e-6 relative.
"""

import ast
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_ds.eval.features import center_crop_square, clean_resize, preprocess
from t2i_ds.eval.stats import frechet_distance

sys.path.append(str(Path(sys.prefix) / "nodeps"))  # where make venv puts clean-fid
cleanfid_resize = pytest.importorskip("cleanfid.resize", reason="clean-fid not installed (make venv installs it --no-deps)")


def photographs() -> list[Path]:
    """Real photos installed by test dependencies: scikit-learn's china/flower, matplotlib's grace_hopper."""
    found = []
    for package, rel in (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                         ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / rel
            if path.is_file():
                found.append(path)
    if not found:
        pytest.skip("no photograph found in scikit-learn or matplotlib")
    return found


def variants(path: Path):
    """The photo as clean-fid reads it, plus a small and a non-square crop (up- and down-sampling, odd sizes)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
    yield rgb
    yield np.asarray(Image.fromarray(rgb).resize((97, 131), Image.BILINEAR))  # smaller than 299: upsampling
    yield rgb[17:17 + 301, 5:5 + 433]


def test_clean_resize_equals_cleanfid_on_photographs():
    theirs = cleanfid_resize.make_resizer("PIL", False, "bicubic", (299, 299))
    checked = 0
    for path in photographs():
        for image in variants(path):
            ours, ref = clean_resize(image), theirs(image)
            assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (299, 299, 3)
            assert ours.tobytes() == ref.tobytes(), f"{path.name} {image.shape}: max diff {np.abs(ours - ref).max()}"
            checked += 1
    print(f"{checked} photographs: byte-identical 299 x 299 float32 arrays")
    assert checked >= 3


def test_full_preprocessing_equals_cleanfid_steps_on_photographs():
    """center crop, GigaGAN's uint8 LANCZOS to 256 (clean-fid's quantised PIL resizer), then clean bicubic 299."""
    lanczos = cleanfid_resize.make_resizer("PIL", True, "lanczos", (256, 256))
    bicubic = cleanfid_resize.make_resizer("PIL", False, "bicubic", (299, 299))
    for path in photographs():
        img = Image.open(path).convert("RGB")
        square = np.asarray(center_crop_square(img))
        ref = bicubic(lanczos(square))  # (299, 299, 3)
        ours = preprocess(img, 256).permute(1, 2, 0).numpy()  # (3, 299, 299) -> (299, 299, 3)
        assert ours.tobytes() == ref.tobytes(), path.name
        assert preprocess(img, None).permute(1, 2, 0).numpy().tobytes() == bicubic(square).tobytes()


def cleanfid_frechet_distance():
    """clean-fid's own `frechet_distance`, taken from cleanfid/fid.py (which imports torchvision at module level)."""
    from scipy import linalg

    spec = importlib.util.find_spec("cleanfid")
    source = (Path(spec.submodule_search_locations[0]) / "fid.py").read_text()
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "frechet_distance"]
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module([node], type_ignores=[]), "cleanfid/fid.py", "exec"), namespace)
    return namespace["frechet_distance"]


def realistic_stats(d: int, n: int, rng, shift: float):
    """Inception-like features: non-negative (post-ReLU pooling), a decaying spectrum, correlated dimensions."""
    mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / (d / 8))[None, :]
    x = np.abs(rng.standard_normal((n, d)) @ mix.T + shift)  # (n, d)
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d, n", [(64, 500), (256, 1500)])
def test_frechet_distance_equals_cleanfid_scipy_formula(d, n):
    theirs = cleanfid_frechet_distance()
    rng = np.random.default_rng(d)
    mu1, s1 = realistic_stats(d, n, rng, 0.3)
    mu2, s2 = realistic_stats(d, n, rng, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy 1.17 deprecates sqrtm's disp=, clean-fid passes it
        ref = float(theirs(mu1, s1, mu2, s2))
        same_ref = float(theirs(mu1, s1, mu1, s1))
    ours = frechet_distance(mu1, s1, mu2, s2)
    print(f"d={d}: ours {ours!r} clean-fid {ref!r} rel diff {abs(ours - ref) / ref:.2e}; identical: clean-fid {same_ref:.2e}")
    assert ours == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) <= max(abs(same_ref), 1e-9 * np.trace(s1)) * 10
