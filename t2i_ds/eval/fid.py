"""COCO-30K FID as users trust it: the GigaGAN evaluation script (used by LlamaGen, Janus) on clean-fid.

Protocol, applied identically to every reference and every generated image (`preprocess`):

1. the image as uint8 RGB (`Image.open(path).convert("RGB")`, no EXIF rotation, as clean-fid reads);
2. center crop to a square of the short side (torchvision `center_crop(img, min(img.size))`, whose
   offsets are `int(round((W - side) / 2))`, `int(round((H - side) / 2))`): GigaGAN's CenterCropLongEdge;
3. if `resize`: PIL LANCZOS resize to (resize, resize), quantised to uint8 (GigaGAN `eval_res`=256; a
   no-op for images already at that size: PIL returns a copy);
4. clean-fid mode "clean": each channel as a float32 PIL image (mode "F"), BICUBIC resize to 299 x 299,
   clipped to [0, 255], not quantised (clean-fid's `make_resizer("PIL", False, "bicubic", (299, 299))`,
   byte for byte: tests/test_cleanfid_parity.py);
5. Inception-v3 pool features (2048) from the StyleGAN2-ADA TorchScript `inception-2015-12-05.pt`:
   clean-fid calls `model.layers((x - 128) / 128)` on the (B, 3, 299, 299) float [0, 255] batch; a
   TorchScript file without `.layers` is called as `model(x, return_features=True)` (StyleGAN2-ADA's
   own call; that forward resizes bilinearly to 299, a no-op here, and normalises the same way).
6. Gaussian statistics in float64: mean and unbiased covariance (np.cov(rowvar=False), ddof=1);
7. the Frechet distance (`frechet_distance`; equal to scipy's sqrtm formula that clean-fid and pytorch-fid use).

Steps 1-5 live in t2i_ds.eval.features, 6-7 in t2i_ds.eval.stats, the captions and the sharded generation of
one PNG per caption in t2i_ds.eval.generation, the CLIP score in t2i_ds.eval.clip_score. This module: the
reference statistics, the statistics of a folder of generated images, and the report.

The reference statistics of a folder (COCO val2014: every image, recursively, sorted by path) are
cached as an .npz keyed by (folder listing, extractor sha256, resize). Nothing is ever downloaded:
the extractor and the CLIP model are local files.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from t2i_ds.eval.features import (  # noqa: F401  (re-exported: the FID API in one place)
    INCEPTION_SIZE, FeatureExtractor, TorchScriptExtractor, center_crop_square, clean_resize, preprocess,
    resizer_description, sha256_file,
)
from t2i_ds.eval.generation import (  # noqa: F401
    SETTINGS_FILE, generate_folder, image_name, meta_path, missing_images, read_captions,
)
from t2i_ds.eval.stats import GaussianStats, RunningStats, frechet_distance, trace_sqrt_product  # noqa: F401
from t2i_ds.progress import Progress
from t2i_ds.provenance import git_revision

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # clean-fid's, minus .npy
STATS_VERSION = 1  # bump when the preprocessing changes: cached reference stats then no longer match


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
# Generated images: a folder of {caption index:06d}.png
# ----------------------------------------------------------------------------------------------


class _Generated(torch.utils.data.Dataset):
    """Image i of the folder: the protocol's (3, 299, 299) input and the uint8 pixels (for CLIP)."""

    def __init__(self, folder: Path, n: int, resize: int | None):
        self.folder, self.n, self.resize = folder, n, resize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with Image.open(self.folder / image_name(i)) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return preprocess(pixels, self.resize), torch.from_numpy(pixels.copy())


def _collate(batch):
    return torch.stack([x for x, _ in batch]), [p.numpy() for _, p in batch]


def generated_stats(folder, captions: Sequence[str], extractor: FeatureExtractor, *, resize: int | None, clip=None,
                    batch_size: int = 64, workers: int = 0) -> tuple[GaussianStats, float | None]:
    """FID statistics of `folder/{i:06d}.png`, i < len(captions), and their mean CLIP score (None without `clip`)."""
    folder = Path(folder)
    missing = missing_images(folder, len(captions))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(captions)} images missing in {folder} (first: "
                                f"{image_name(missing[0])}): finish the generation first (rerun it: it resumes)")
    loader = torch.utils.data.DataLoader(_Generated(folder, len(captions), resize), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    stats, clip_sum, seen = RunningStats(), 0.0, 0
    with Progress(len(captions), "[fid] generated features", "images") as bar:
        for x, pixels in loader:
            stats.update(extractor(x))
            if clip is not None:
                clip_sum += float(clip.scores(pixels, captions[seen : seen + len(pixels)]).sum())
            seen += len(pixels)
            bar.update(len(pixels))
            resolution = int(pixels[0].shape[0])
    return stats.result({"resolution": resolution}), (clip_sum / seen if clip is not None else None)


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


def evaluate_fid(run, captions_path, reference, extractor: FeatureExtractor, out_dir, *, images=None, clip=None,
                 n: int | None = 30_000, cfg_scale: float = 3.0, top_k: int | None = 1000, temperature: float = 1.0,
                 seed: int = 0, batch_size: int = 64, resize: int | None = 256, workers: int = 0, run_dir=None,
                 checkpoint: str | None = None, log: Callable[[str], None] = print) -> dict:
    """FID (and CLIP score with `clip`) of the images for the captions against `reference`; appended to out_dir/fid.jsonl.

    run: an InferenceRun to generate with (into `images`, default out_dir/images; resumes), or None to score the
    PNGs already in `images` (written by `t2i_ds.generate --out_dir`, e.g. over 8 GPUs).
    """
    t = time.perf_counter()
    captions = read_captions(captions_path, n)
    images = Path(images) if images is not None else Path(out_dir) / "images"
    if run is not None:
        describe = {"run": str(Path(run_dir).resolve()) if run_dir else None, "checkpoint": checkpoint or "newest complete"}
        generate_folder(run, captions, images, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, seed=seed,
                        batch_size=batch_size, describe=describe, log=log)
    ref, ref_info = reference_stats(reference, extractor, resize, Path(out_dir) / "reference_stats", batch_size, workers, log)
    gen, clip_score = generated_stats(images, captions, extractor, resize=resize, clip=clip, batch_size=batch_size,
                                      workers=workers)
    settings_file = images / SETTINGS_FILE
    generation = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    selection = meta_path(captions_path)
    report = {
        "metric": "fid", "fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "n": gen.n,
        "clip_score": clip_score, "resolution": gen.meta["resolution"], "resize": resize,
        "resizer": resizer_description(resize), **ref_info, **extractor.describe(), **(clip.describe() if clip else {}),
        "captions": str(Path(captions_path).resolve()), "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
        "caption_selection": json.loads(selection.read_text()) if selection.is_file() else None,
        "images": str(images.resolve()), "generation": generation,
        **{k: (generation or {}).get(k) for k in ("cfg_scale", "top_k", "temperature", "seed", "run", "checkpoint")},
        "protocol": "GigaGAN/clean-fid COCO-30K: one caption per image id (t2i_ds.eval.generation), one image per caption "
                    "(sampling keyed by caption index), preprocessing as 'resizer', Inception pool3 features, float64 "
                    "Gaussian statistics, Frechet distance; CLIP score as 'clip_score_formula' says",
        "commit": git_revision(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t, 1),
    }
    if not math.isfinite(report["fid"]):
        raise RuntimeError(f"FID is not finite: {report['fid']}")  # a bug, not a user error: keep the traceback
    append_report(report, out_dir)
    return report
