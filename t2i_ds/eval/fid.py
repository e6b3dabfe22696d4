"""COCO-30K FID as users trust it: the GigaGAN evaluation script (used by LlamaGen, Janus) on clean-fid.

Protocol, applied identically to every reference and every generated image (`preprocess`):

1. the image as uint8 RGB (`Image.open(path).convert("RGB")`, no EXIF rotation, as clean-fid reads);
2. center crop to a square of the short side (torchvision `center_crop(img, min(img.size))`, whose
   offsets are `int(round((W - side) / 2))`, `int(round((H - side) / 2))`): GigaGAN's CenterCropLongEdge;
3. if `resize`: PIL LANCZOS resize to (resize, resize), quantised to uint8 (GigaGAN `eval_res`=256; a
   no-op for images already at that size: PIL returns a copy);
4. clean-fid mode "clean": each channel as a float32 PIL image (mode "F"), BICUBIC resize to 299 x 299,
   clipped to [0, 255], not quantised;
5. Inception-v3 pool features (2048) from the StyleGAN2-ADA TorchScript `inception-2015-12-05.pt`:
   clean-fid calls `model.layers((x - 128) / 128)` on the (B, 3, 299, 299) float [0, 255] batch; a
   TorchScript file without `.layers` is called as `model(x, return_features=True)` (StyleGAN2-ADA's
   own call; that forward resizes bilinearly to 299, a no-op here, and normalises the same way).
6. Gaussian statistics in float64: mean and unbiased covariance (np.cov(rowvar=False), ddof=1);
7. the Frechet distance (`frechet_distance`).

The reference statistics of a folder (COCO val2014: every image, recursively, sorted by path) are
cached as an .npz keyed by (folder listing, extractor sha256, resize). Nothing is ever downloaded:
the extractor is a local file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from t2i_ds.atomic import atomic_open
from t2i_ds.progress import Progress
from t2i_ds.provenance import git_revision

INCEPTION_SIZE = 299  # Inception-v3 input side; clean-fid resizes to it outside the network
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # clean-fid's, minus .npy
STATS_VERSION = 1  # bump when the preprocessing changes: cached reference stats then no longer match


def resizer_description(resize: int | None) -> str:
    """The preprocessing in words, logged beside every number."""
    lanczos = f"PIL LANCZOS to {resize}x{resize} (uint8); " if resize else ""
    return (f"center crop to the short side; {lanczos}clean-fid 'clean': PIL BICUBIC per channel (float32) "
            f"to {INCEPTION_SIZE}x{INCEPTION_SIZE}, clip [0, 255]")


# ----------------------------------------------------------------------------------------------
# Preprocessing (steps 1-4)
# ----------------------------------------------------------------------------------------------


def center_crop_square(img: Image.Image) -> Image.Image:
    """The central side x side square, side = min(W, H), offsets rounded as torchvision's center_crop."""
    w, h = img.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return img if (w, h) == (side, side) else img.crop((left, top, left + side, top + side))


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resizer: (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255], per channel."""
    channels = []
    for c in range(3):
        ch = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")  # float, so no quantisation
        channels.append(np.asarray(ch.resize((size, size), resample=Image.BICUBIC)).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


def preprocess(image: np.ndarray | Image.Image, resize: int | None) -> torch.Tensor:
    """One RGB image (uint8 (H, W, 3) or PIL) -> (3, 299, 299) float32 in [0, 255] (steps 2-4)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image), "RGB")
    img = center_crop_square(img.convert("RGB"))
    if resize:
        img = img.resize((resize, resize), Image.LANCZOS)  # same size: PIL returns a copy
    return torch.from_numpy(clean_resize(np.asarray(img, dtype=np.uint8))).permute(2, 0, 1)  # (3, 299, 299)


# ----------------------------------------------------------------------------------------------
# Feature extractors (step 5)
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """(B, 3, 299, 299) float32 in [0, 255] -> (B, D) features; `describe()` goes into every report."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict:
        """At least `extractor` (a name or path) and `extractor_sha256` (identity of the weights)."""
        ...


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TorchScriptExtractor:
    """A local TorchScript Inception (`inception-2015-12-05.pt`, or any module with its signature).

    call="layers": clean-fid's exact call, `module.layers((x - 128) / 128).reshape(B, -1)`;
    call="forward": `module(x, return_features=True)` (StyleGAN2-ADA's call);
    call="auto": "layers" when the module has a `layers` submodule, else "forward".
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", call: str = "auto"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception extractor not found at {path}: pass a local copy of the StyleGAN2-ADA / clean-fid "
                "TorchScript 'inception-2015-12-05.pt' (this command never downloads it)")
        if call not in ("auto", "layers", "forward"):
            raise ValueError(f"call={call!r} must be 'auto', 'layers' or 'forward'")
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"{path} is not a loadable TorchScript file: {str(e).strip().splitlines()[0]}") from e
        if call == "auto":
            call = "layers" if hasattr(self.module, "layers") else "forward"
        self.path, self.call, self.device = path, call, torch.device(device)
        self.sha256 = sha256_file(path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)  # (B, 3, 299, 299) in [0, 255]
        if self.call == "layers":
            return self.module.layers((x - 128) / 128).reshape(x.shape[0], -1)  # (B, 2048)
        return self.module(x, return_features=True).reshape(x.shape[0], -1)  # (B, 2048)

    def describe(self) -> dict:
        call = "module.layers((x - 128) / 128)" if self.call == "layers" else "module(x, return_features=True)"
        return {"extractor": str(self.path.resolve()), "extractor_sha256": self.sha256, "extractor_call": call}


# ----------------------------------------------------------------------------------------------
# Gaussian statistics (step 6) and the Frechet distance (step 7)
# ----------------------------------------------------------------------------------------------


@dataclass
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D), float64, of n feature vectors, with provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (mu, sigma, n, meta as JSON) through a temporary file and an atomic rename."""
        with atomic_open(path, "wb") as f:  # a file object: np.savez must not append ".npz" to the name
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """An .npz written by `save`, or any .npz with `mu` and `sigma` (clean-fid's; n unknown: -1)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(z.keys())})")
                n = int(z["n"]) if "n" in z else -1
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        except (OSError, EOFError) as e:  # zipfile/np errors for a damaged or foreign file
            raise ValueError(f"{path} is not a readable .npz of FID statistics: {e}") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
        return cls(mu, sigma, n, meta)


class RunningStats:
    """Streaming mean and covariance in float64, shifted by the first batch's mean for accuracy."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats: torch.Tensor) -> None:
        x = feats.detach().to("cpu", torch.float64).reshape(feats.shape[0], -1)  # (B, D)
        if self.shift is None:
            self.shift = x.mean(0)  # (D,)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        x = x - self.shift
        self.s1 += x.sum(0)  # (D,)
        self.s2 += x.T @ x  # (D, D)
        self.n += x.shape[0]

    def result(self, meta: dict | None = None) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mean = self.s1 / self.n  # (D,) mean of the shifted features
        sigma = (self.s2 - self.n * torch.outer(mean, mean)) / (self.n - 1)  # (D, D) unbiased
        sigma = (sigma + sigma.T) / 2  # exactly symmetric
        return GaussianStats((self.shift + mean).numpy(), sigma.numpy(), self.n, dict(meta or {}))


def _clamp_roundoff(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with those below D * eps * max|w| set to 0.

    That threshold is numpy's matrix_rank / pinv tolerance: below it an eigenvalue cannot be told apart
    from the rounding error of the decomposition. A rank-deficient covariance (n <= D images) has
    exact zeros that round-off turns into +-1e-16-sized values: clamping them gives no NaN from a
    negative square root, and zeroing the tiny positive ones removes their sqrt(round-off) error.
    """
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, torch.zeros_like(w))


def trace_sqrt_product(sigma1: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Tr((S1 S2)^{1/2}) = Tr((A S2 A)^{1/2}) = sum sqrt(eig(A S2 A)), A = S1^{1/2}, in float64.

    S1 S2 = A (A S2) and A S2 A = (A S2) A have the same eigenvalues (XY and YX do), and A S2 A is
    symmetric PSD, so `eigh` applies: no non-symmetric sqrtm, no complex parts, no scipy.
    Cost at D = 2048 on 2 CPU cores: 10-25 s (one eigh, one eigvalsh, three matmuls); negligible on a
    GPU host next to sampling 30k images.
    """
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    w1, v1 = torch.linalg.eigh((s1 + s1.T) / 2)  # (D,), (D, D)
    a = (v1 * _clamp_roundoff(w1).sqrt()) @ v1.T  # (D, D) S1^{1/2}
    m = a @ s2 @ a  # (D, D) A S2 A
    w = _clamp_roundoff(torch.linalg.eigvalsh((m + m.T) / 2))  # (D,) its eigenvalues, >= 0
    return float(w.sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 0.0) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2), float64.

    eps: added to both diagonals (clean-fid's fallback uses 1e-6 when scipy's sqrtm fails). Not needed
    here: rank deficiency is handled inside the eigendecompositions (`_clamp_roundoff`), so the default 0
    leaves full-rank results exact.
    """
    mu1 = torch.as_tensor(mu1, dtype=torch.float64)
    mu2 = torch.as_tensor(mu2, dtype=torch.float64)
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    if eps:
        s1 = s1 + eps * torch.eye(s1.shape[0], dtype=torch.float64)
        s2 = s2 + eps * torch.eye(s2.shape[0], dtype=torch.float64)
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2)) - 2 * trace_sqrt_product(s1, s2)


# ----------------------------------------------------------------------------------------------
# Reference statistics: an image folder (cached) or a given .npz
# ----------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path (clean-fid's selection, .npy aside)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"reference image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return files


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], resize: int | None):
        self.files, self.resize = files, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return preprocess(img.convert("RGB"), self.resize)  # (3, 299, 299)


def folder_stats(folder, extractor: FeatureExtractor, resize: int | None, batch_size: int = 64,
                 workers: int = 0) -> GaussianStats:
    """Statistics of every image under `folder`, preprocessed as the protocol says (with a progress display)."""
    files = list_images(folder)
    loader = torch.utils.data.DataLoader(_ImageFiles(files, resize), batch_size=batch_size, num_workers=workers)
    stats = RunningStats()
    with Progress(len(files), "[fid] reference features", "images") as bar:
        for batch in loader:
            stats.update(extractor(batch))
            bar.update(len(batch))
    return stats.result()


def folder_key(folder, extractor: FeatureExtractor, resize: int | None) -> dict:
    """What the cached statistics of `folder` depend on; a change in any of them means recomputing."""
    files = list_images(folder)
    listing = hashlib.sha256("".join(f"{p.relative_to(folder)}\t{p.stat().st_size}\n" for p in files).encode())
    return {
        "stats_version": STATS_VERSION, "reference": str(Path(folder).resolve()), "reference_files": len(files),
        "listing_sha256": listing.hexdigest(), "extractor_sha256": extractor.describe()["extractor_sha256"],
        "resize": resize, "resizer": resizer_description(resize),
    }


def reference_stats(reference, extractor: FeatureExtractor, resize: int | None, cache_dir, batch_size: int = 64,
                    workers: int = 0, log: Callable[[str], None] = print) -> tuple[GaussianStats, dict]:
    """Stats of `reference` (an .npz, or an image folder cached under `cache_dir`) and a report dict.

    An .npz that records its extractor sha256 or resize must agree with this evaluation's: numbers from
    different features or preprocessing are not comparable. One without them (clean-fid's own
    `make_custom_stats` files) is taken as it is and reported as unverified.
    """
    reference = Path(reference)
    if reference.suffix == ".npz":
        if not reference.is_file():
            raise FileNotFoundError(f"reference statistics {reference} do not exist")
        stats = GaussianStats.load(reference)
        want = {"extractor_sha256": extractor.describe()["extractor_sha256"], "resize": resize}
        for k, v in want.items():
            if k in stats.meta and stats.meta[k] != v:
                raise ValueError(f"{reference} was computed with {k}={stats.meta[k]!r}, this evaluation uses {v!r}")
        verified = all(k in stats.meta for k in want)
        return stats, {"reference": stats.meta.get("reference", str(reference.resolve())), "reference_n": stats.n,
                       "reference_stats": str(reference.resolve()), "reference_source": "npz" if verified else "npz (unverified)"}
    key = folder_key(reference, extractor, resize)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{reference.resolve().name}-{digest}.npz"
    source = "cache"
    if cache.is_file() and GaussianStats.load(cache).meta == key:
        stats = GaussianStats.load(cache)
        log(f"[fid] reference statistics: {cache} (cached, n={stats.n})")
    else:
        log(f"[fid] reference statistics: computing over {key['reference_files']} images of {reference}")
        stats = folder_stats(reference, extractor, resize, batch_size, workers)
        stats.meta = key
        stats.save(cache)
        source = "computed"
    return stats, {"reference": key["reference"], "reference_n": stats.n, "reference_stats": str(cache.resolve()),
                   "reference_source": source}


# ----------------------------------------------------------------------------------------------
# Generated images
# ----------------------------------------------------------------------------------------------


def read_captions(path, n: int | None) -> list[str]:
    """The first n captions of a .txt (one per line) or .jsonl (a "caption" or "text" key per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        captions = []
        for i, line in enumerate(lines):
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("caption", row.get("text")), str):
                raise ValueError(f"{path}: line {i + 1} has no string 'caption' (or 'text') field")
            captions.append(row.get("caption", row.get("text")))
    else:
        captions = [line.strip() for line in lines]
    if n is not None and n > 0:
        if len(captions) < n:
            raise ValueError(f"{path} has {len(captions)} captions, fewer than --n {n}")
        captions = captions[:n]
    if len(captions) < 2:
        raise ValueError(f"{path}: FID needs at least 2 captions, got {len(captions)}")
    return captions


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of one chunk's generator, in [0, 2**32): torch's CPU generator (mt19937) keeps only the low
    32 bits of a seed. Distinct for every chunk of a run (chunk < 2**32), and across runs whose seeds
    differ by less than 4,294 unless they have more than 10**6 chunks."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must lie in [0, 2**31), got {seed}")
    return (seed * 1_000_003 + chunk) % 2**32


def generated_stats(run, captions: Sequence[str], extractor: FeatureExtractor, *, resize: int | None, cfg_scale: float,
                    top_k: int | None, temperature: float, seed: int, batch_size: int, save_dir=None,
                    log: Callable[[str], None] = print) -> GaussianStats:
    """Sample one image per caption with `run` (a t2i_ds.inference.InferenceRun), decode, accumulate features.

    Captions are ordered by prompt length and cut into chunks of `batch_size`, so that the sampler's
    left-padded batches carry little padding; chunk k samples from `chunk_seed(seed, k)`. The images
    are therefore a function of (run, captions, settings, seed, batch_size). With `save_dir`, each is
    written losslessly as `save_dir/{caption index:06d}.png` at the model's resolution.
    """
    from t2i_ds.data.images import to_uint8
    from t2i_ds.sampling import generate_images

    if run.image_tokenizer is None:
        raise ValueError("the run's config names no train.image_tokenizer to decode images with")
    vocab, device = run.vocab, next(run.model.parameters()).device
    ids = run.text_tokenizer.encode_batch(list(captions))
    order = sorted(range(len(ids)), key=lambda i: len(vocab.prompt(ids[i])))  # stable: input order within a length
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    stats, t = RunningStats(), time.perf_counter()
    for k, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        codes = generate_images(run.model, vocab, [ids[i] for i in idx], cfg_scale=cfg_scale, top_k=top_k,
                                temperature=temperature, seed=chunk_seed(seed, k), batch_size=batch_size)
        images = to_uint8(run.image_tokenizer.decode(codes.to(device)))  # (b, H, W, 3) uint8
        if save_dir is not None:
            for i, image in zip(idx, images):
                Image.fromarray(image).save(Path(save_dir) / f"{i:06d}.png")
        stats.update(extractor(torch.stack([preprocess(image, resize) for image in images])))
        log(f"[fid] generated {stats.n}/{len(order)} images ({time.perf_counter() - t:.0f} s)")
    return stats.result({"resolution": int(images.shape[1])})


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def append_report(report: dict, out_dir) -> Path:
    """Append one JSON line to out_dir/fid.jsonl."""
    path = Path(out_dir) / "fid.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(report) + "\n")
    return path


def evaluate_fid(run, captions_path, reference, extractor: FeatureExtractor, out_dir, *, n: int | None = 30_000,
                 cfg_scale: float = 3.0, top_k: int | None = 1000, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 64, resize: int | None = 256, save_images: bool = False, workers: int = 0,
                 run_dir=None, checkpoint: str | None = None, log: Callable[[str], None] = print) -> dict:
    """FID of `run`'s samples for the captions against `reference`; the report is appended to out_dir/fid.jsonl."""
    t = time.perf_counter()
    captions = read_captions(captions_path, n)
    ref, ref_info = reference_stats(reference, extractor, resize, Path(out_dir) / "reference_stats", batch_size, workers, log)
    gen = generated_stats(run, captions, extractor, resize=resize, cfg_scale=cfg_scale, top_k=top_k,
                          temperature=temperature, seed=seed, batch_size=batch_size,
                          save_dir=Path(out_dir) / "images" if save_images else None, log=log)
    report = {
        "metric": "fid", "fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "n": gen.n,
        "resolution": gen.meta["resolution"], "resize": resize, "resizer": resizer_description(resize),
        **ref_info, **extractor.describe(),
        "run": str(Path(run_dir).resolve()) if run_dir else None, "checkpoint": checkpoint or "newest complete",
        "captions": str(Path(captions_path).resolve()),
        "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature, "seed": seed, "batch_size": batch_size,
        "images": str((Path(out_dir) / "images").resolve()) if save_images else None,
        "commit": git_revision(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t, 1),
    }
    if not math.isfinite(report["fid"]):
        raise RuntimeError(f"FID is not finite: {report['fid']}")  # a bug, not a user error: keep the traceback
    append_report(report, out_dir)
    return report
