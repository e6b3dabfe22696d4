"""FID: the Frechet distance against closed forms, the clean-fid preprocessing, reference-stat caching,
a TorchScript stand-in for the Inception file, and the `evaluate fid` command end to end on a debug model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from t2i_ds.eval import fid as eval_fid
from t2i_ds.eval.fid import (
    GaussianStats, RunningStats, TorchScriptExtractor, center_crop_square, clean_resize, frechet_distance,
    preprocess, reference_stats,
)

ROOT = Path(__file__).resolve().parents[1]
EPS64 = np.finfo(np.float64).eps


def closed_form(mu1, a, mu2, b):
    """FID of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T) (commuting covariances): sqrt acts on a * b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def wishart(d, n, rng):
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, d)  # (n, d), uneven scales
    return np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_diagonal_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    got, want = frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), closed_form(mu1, a, mu2, b)
    print(f"d={d}: got {got!r} want {want!r} diff {abs(got - want):.3e}")
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_frechet_rotated_commuting_closed_form():
    """Same eigenvectors, non-diagonal: the eigen route must not rely on diagonal inputs."""
    rng = np.random.default_rng(1)
    d = 48
    q = random_orthogonal(d, rng)
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    want = closed_form(mu1, a, mu2, b)
    print(f"rotated: diff {abs(got - want):.3e}")
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_identical_and_shifted_mean():
    rng = np.random.default_rng(2)
    d = 64
    sigma, mu = wishart(d, 500, rng), rng.standard_normal(d)
    same = frechet_distance(mu, sigma, mu, sigma)
    shift = rng.standard_normal(d)
    shifted = frechet_distance(mu + shift, sigma, mu, sigma)
    print(f"identical: {same:.3e} (trace {np.trace(sigma):.3f}); shifted: {shifted - shift @ shift:.3e}")
    # Identical full-rank stats: Tr S + Tr S - 2 sum sqrt(eig(S^{1/2} S S^{1/2})) = 0 up to eigh round-off,
    # O(d * eps * ||S||) relative to the trace.
    assert abs(same) <= 1e-9 * np.trace(sigma)
    assert shifted == pytest.approx(float(shift @ shift), rel=1e-9, abs=1e-9 * np.trace(sigma))


def test_frechet_symmetric_for_non_commuting_covariances():
    rng = np.random.default_rng(3)
    d = 40
    s1, s2 = wishart(d, 300, rng), wishart(d, 300, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    f12, f21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    print(f"f12 {f12!r} f21 {f21!r}")
    assert f12 > 0 and f12 == pytest.approx(f21, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_on_full_rank():
    """The classic formula (clean-fid / pytorch-fid: scipy.linalg.sqrtm of S1 S2), where scipy is installed."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    d = 32
    s1, s2 = wishart(d, 200, rng), wishart(d, 200, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_rank_deficient_is_finite_and_zero_for_identical():
    """n <= d (a small evaluation): singular covariances, no NaN, ~0 for identical statistics."""
    rng = np.random.default_rng(5)
    d, n = 64, 6
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.5
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert np.linalg.matrix_rank(sx) == n - 1
    f = frechet_distance(x.mean(0), sx, y.mean(0), sy)
    same = frechet_distance(x.mean(0), sx, x.mean(0), sx)
    print(f"rank-deficient: fid {f:.6f}, identical {same:.3e}, trace {np.trace(sx):.3f}")
    assert np.isfinite(f) and f > 0
    assert f == pytest.approx(frechet_distance(y.mean(0), sy, x.mean(0), sx), rel=1e-8)
    # Tolerance: eigenvalues below d * eps * max are zeroed, so what survives carries relative round-off
    # O(d * eps); its square roots then err by O(sqrt(d * eps)) ~ 1e-7 of the trace at most.
    assert abs(same) <= np.sqrt(d * EPS64) * np.trace(sx)
    rank_one = np.outer(x[0], x[0])  # rank 1: Tr sqrt(S S) = Tr S exactly
    assert abs(frechet_distance(x[0], rank_one, x[0], rank_one)) <= np.sqrt(d * EPS64) * np.trace(rank_one)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_stats_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((37, 9)) * 3 + 100  # a large mean: the shift keeps the covariance accurate
    rs = RunningStats()
    for lo, hi in [(0, 5), (5, 6), (6, 30), (30, 37)]:
        rs.update(torch.from_numpy(x[lo:hi]).float())
    stats = rs.result()
    xf = x.astype(np.float32).astype(np.float64)  # what the stats saw
    np.testing.assert_allclose(stats.mu, xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(xf, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.n == 37
    with pytest.raises(ValueError, match="at least 2"):
        RunningStats().result()


def test_gaussian_stats_npz_roundtrip_is_atomic(tmp_path):
    s = GaussianStats(np.arange(3.0), np.eye(3), 5, {"resize": 256})
    path = tmp_path / "sub" / "ref.npz"
    s.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary file left behind
    back = GaussianStats.load(path)
    assert back.n == 5 and back.meta == {"resize": 256} and np.array_equal(back.sigma, np.eye(3))
    np.savez(tmp_path / "cleanfid.npz", mu=np.zeros(3), sigma=np.eye(3))  # clean-fid's own format
    assert GaussianStats.load(tmp_path / "cleanfid.npz").n == -1


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def test_center_crop_offsets_follow_torchvision_rounding():
    img = Image.fromarray(np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3))  # W=7, H=4
    crop = center_crop_square(img)
    assert crop.size == (4, 4)
    # torchvision: left = int(round((7 - 4) / 2)) = round(1.5) = 2 (banker's rounding)
    assert np.array_equal(np.asarray(crop), np.asarray(img)[:, 2:6])
    tall = Image.fromarray(np.zeros((9, 4, 3), np.uint8))
    assert center_crop_square(tall).size == (4, 4)


def test_clean_resize_is_float_per_channel_bicubic():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    out = clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
    one = np.asarray(Image.fromarray(img[:, :, 1].astype(np.float32), "F").resize((299, 299), Image.BICUBIC)).clip(0, 255)
    assert np.array_equal(out[:, :, 1], one)
    assert not np.array_equal(out, np.round(out))  # not quantised to uint8


def test_preprocess_at_the_eval_resolution_skips_the_lanczos_resize():
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    direct = torch.from_numpy(clean_resize(img)).permute(2, 0, 1)
    assert torch.equal(preprocess(img, 64), direct)
    assert torch.equal(preprocess(img, None), direct)
    assert not torch.equal(preprocess(img, 32), direct)
    assert preprocess(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), 32).shape == (3, 299, 299)


# ----------------------------------------------------------------------------------------------
# A TorchScript stand-in for inception-2015-12-05.pt
# ----------------------------------------------------------------------------------------------


class TinyLayers(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = nn.Conv2d(3, dims, kernel_size=16, stride=16)  # (B, 3, 299, 299) -> (B, D, 18, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1)  # (B, D, 1, 1), like Inception's pool3


class TinyInception(nn.Module):
    """The real file's structure: `.layers` on normalised 299 px input; forward resizes and normalises."""

    def __init__(self, dims: int = 16):
        super().__init__()
        self.layers = TinyLayers(dims)
        self.fc = nn.Linear(dims, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(img.shape[0], -1)  # (B, D)
        return features if return_features else self.fc(features)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny-inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def test_stand_in_extractor_features_and_calls_agree(inception_path):
    ext = TorchScriptExtractor(inception_path)
    assert ext.call == "layers" and len(ext.describe()["extractor_sha256"]) == 64
    rng = np.random.default_rng(9)
    images = torch.stack([preprocess(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), 32) for _ in range(5)])
    feats = ext(images)
    assert feats.shape == (5, 16) and feats.dtype == torch.float32
    # StyleGAN2-ADA's call resizes bilinearly to 299 inside: an identity on 299 px input, so the two agree.
    forward = TorchScriptExtractor(inception_path, call="forward")(images)
    print(f"layers vs forward: max diff {(feats - forward).abs().max():.3e}")
    torch.testing.assert_close(forward, feats, rtol=0, atol=1e-6)
    stats = eval_fid.RunningStats()
    stats.update(feats)
    np.testing.assert_allclose(stats.result().sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)


def test_missing_or_damaged_extractor_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt.*never downloads"):
        TorchScriptExtractor(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt is not a loadable TorchScript"):
        TorchScriptExtractor(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / "nested" if i % 2 else folder
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"img{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")


def test_reference_folder_stats_cached_and_reused(tmp_path, inception_path, monkeypatch):
    ref = tmp_path / "val2014"
    write_images(ref, 7, seed=10)
    ext = TorchScriptExtractor(inception_path)
    first, info = reference_stats(ref, ext, 32, tmp_path / "cache", batch_size=3, log=lambda s: None)
    assert info["reference_source"] == "computed" and first.n == info["reference_n"] == 7
    assert first.meta["extractor_sha256"] == ext.sha256 and first.meta["resize"] == 32
    monkeypatch.setattr(eval_fid, "folder_stats", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    second, info2 = reference_stats(ref, ext, 32, tmp_path / "cache", log=lambda s: None)
    assert info2["reference_source"] == "cache" and info2["reference_stats"] == info["reference_stats"]
    assert np.array_equal(second.sigma, first.sigma)
    monkeypatch.undo()
    # Another resize or another image set is another key: recomputed, never a stale cache.
    _, info3 = reference_stats(ref, ext, 48, tmp_path / "cache", log=lambda s: None)
    write_images(ref / "more", 1, seed=11)
    again, info4 = reference_stats(ref, ext, 32, tmp_path / "cache", log=lambda s: None)
    assert info3["reference_source"] == info4["reference_source"] == "computed" and again.n == 8
    # The cached .npz given as --reference is read back; with other settings it is refused.
    stats, info5 = reference_stats(info["reference_stats"], ext, 32, tmp_path / "unused", log=lambda s: None)
    assert info5["reference_source"] == "npz" and stats.n == 7 and not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="resize=32"):
        reference_stats(info["reference_stats"], ext, 256, tmp_path / "unused")


def test_reference_folder_errors(tmp_path, inception_path):
    ext = TorchScriptExtractor(inception_path)
    with pytest.raises(NotADirectoryError):
        reference_stats(tmp_path / "missing", ext, 32, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        reference_stats(tmp_path / "empty", ext, 32, tmp_path)


# ----------------------------------------------------------------------------------------------
# The command, end to end on a random debug model
# ----------------------------------------------------------------------------------------------


class WordIds:
    """Text tokenizer stand-in: one id in [10, 260) per word (the tiny vocab has 300 text ids)."""

    def encode_batch(self, texts):
        return [[10 + sum(map(ord, w)) % 250 for w in t.split()] for t in texts]


@pytest.fixture(scope="module")
def fake_run():
    from t2i_ds.demo.tokenizer import PatchKMeansTokenizer
    from t2i_ds.model.args import model_preset
    from t2i_ds.model.transformer import build_model
    from t2i_ds.vocab import tiny_vocab

    vocab = tiny_vocab()  # 64 codes, 16 tokens per image: 4 x 4 patches of 8 px = 32 px images
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=vocab.size, seq_len=vocab.seq_len, loss_impl="torch", attn_backend="sdpa")
    model = build_model(args, vocab.modality_bounds).eval()
    codebook = torch.rand(vocab.image_size, 3 * 8 * 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return SimpleNamespace(model=model, vocab=vocab, cfg=None, text_tokenizer=WordIds(),
                           image_tokenizer=PatchKMeansTokenizer(codebook, patch=8, image_size=32))


CAPTIONS = ["a red circle", "a blue square on grass", "two cats", "a red circle", "sky", "a green triangle top left"]


def test_evaluate_fid_command_end_to_end(tmp_path, inception_path, fake_run, monkeypatch, capsys):
    from t2i_ds.eval.__main__ import main

    (tmp_path / "run").mkdir()
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": c, "image_id": i}) + "\n" for i, c in enumerate(CAPTIONS)))
    write_images(tmp_path / "ref", 6, seed=12)
    import t2i_ds.eval.__main__ as eval_command

    monkeypatch.setattr(eval_command, "load_run", lambda run_dir, checkpoint, device: fake_run)
    common = ["fid", "--run", str(tmp_path / "run"), "--captions", str(captions), "--inception", str(inception_path),
              "--n", "6", "--cfg_scale", "2", "--top_k", "16", "--seed", "3", "--batch_size", "4", "--resize", "64",
              "--device", "cpu"]

    out1 = tmp_path / "eval1"
    assert main(common + ["--reference", str(tmp_path / "ref"), "--out", str(out1)]) == 0
    lines = (out1 / "fid.jsonl").read_text().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    assert report["n"] == 6 and report["reference_n"] == 6 and report["resolution"] == 32 and report["resize"] == 64
    assert (report["cfg_scale"], report["top_k"], report["temperature"], report["seed"]) == (2.0, 16, 1.0, 3)
    assert report["generation"]["captions"] == 6 and "caption index" in report["generation"]["sampler"]
    assert report["extractor_sha256"] == eval_fid.sha256_file(inception_path) and report["reference_source"] == "computed"
    assert "LANCZOS to 64x64" in report["resizer"] and "BICUBIC" in report["resizer"] and report["date"]
    assert sorted(p.name for p in (out1 / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]

    # The same samples (same seed) against a reference folder of exactly those images: FID ~ 0.
    out2 = tmp_path / "eval2"
    assert main(common + ["--reference", str(out1 / "images"), "--out", str(out2)]) == 0
    same = json.loads((out2 / "fid.jsonl").read_text())
    # Both sides see identical uint8 pixels (PNG is lossless), so the features can differ only by the
    # float32 round-off of the conv in other batch compositions (~1e-7 relative), which enters FID
    # quadratically (~1e-17 here); with n=6 < D=16 the singular covariances add at most the
    # sqrt(D * eps64) ~ 6e-8 relative error of the eigen route times Tr(S) ~ 2e-3, i.e. ~1e-10. The bound
    # 1e-6 x (FID of different sets, ~2e-3 with this stand-in) = ~2e-9 is above both; measured: 0.
    with capsys.disabled():
        print(f"identical image sets: fid {same['fid']:.3e} (different sets: {report['fid']:.4f})")
    assert abs(same["fid"]) <= 1e-6 * report["fid"]
    assert main(common + ["--reference", str(out1 / "images"), "--out", str(out2)]) == 0  # appends, reuses the cache
    rows = [json.loads(line) for line in (out2 / "fid.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["reference_source"] == "cache" and rows[1]["fid"] == pytest.approx(rows[0]["fid"], abs=1e-9)
    assert '"fid":' in capsys.readouterr().out  # the report is printed too


def test_generation_is_seeded_and_keyed_by_caption_index(fake_run, inception_path, tmp_path):
    """Replaces the chunk-seeded generation (each chunk of length-sorted captions from its own torch.Generator):
    images are now keyed by (seed, caption index), so statistics depend on the seed, not on the batching."""
    ext = TorchScriptExtractor(inception_path)
    kw = dict(cfg_scale=0.0, top_k=None, temperature=1.0, log=lambda s: None)

    def stats(seed, batch_size, name):
        eval_fid.generate_folder(fake_run, CAPTIONS[:4], tmp_path / name, seed=seed, batch_size=batch_size, **kw)
        return eval_fid.generated_stats(tmp_path / name, CAPTIONS[:4], ext, resize=None)[0]

    a, b, c = stats(0, 2, "a"), stats(0, 3, "b"), stats(1, 2, "c")
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)  # another batch size: same images
    assert not np.array_equal(a.mu, c.mu)  # another seed: other images
    for i in range(4):
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()


def test_cli_missing_extractor_is_one_line_exit_2(tmp_path):
    captions = tmp_path / "c.txt"
    captions.write_text("a\nb\n")
    cmd = [sys.executable, "-m", "t2i_ds.eval", "fid", "--run", str(tmp_path), "--captions", str(captions),
           "--reference", str(tmp_path), "--inception", str(tmp_path / "inception-2015-12-05.pt"), "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "T2I_DS_TRACEBACK": ""})
    print(r.stderr)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("t2i_ds.eval: error: Inception extractor not found at") and "inception-2015-12-05.pt" in r.stderr


def test_read_captions(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\n two \nthree\n")
    assert eval_fid.read_captions(txt, None) == ["one", "", "two", "three"]  # line i is caption i, as in generate
    assert eval_fid.read_captions(txt, 2) == ["one", ""]
    with pytest.raises(ValueError, match="fewer than --n 5"):
        eval_fid.read_captions(txt, 5)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"caption": "ok"}\n{"url": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        eval_fid.read_captions(bad, None)
