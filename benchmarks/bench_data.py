"""Data pipeline throughput: prepare (images/s) and TokenLoader (samples/s) against what training consumes.

    .venv/bin/python benchmarks/bench_data.py [--movq-images 64] [--step-seconds 0.5] [--loader-only]

prepare: synthetic 320x240 JPEGs in an img2dataset tar -> decode, crop, MoVQGAN encode, NeoX tokenize, write
(model loading excluded); tiny MoVQ at 16 px and a randomly initialised MoVQGAN-67M at 256 px, batch 64.
loader: paper-sized samples (1,024 codes, seq 1,152) through TokenLoader with 0 and 2 workers (random access by
the world-size-independent order), and the time to index one shard's tar headers.
Rows are appended to benchmarks/results/data.jsonl with device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2i_ds.data.config import DataConfig  # noqa: E402
from t2i_ds.data.loader import TokenLoader, index_shard  # noqa: E402
from t2i_ds.data.movqgan import MOVQGAN_CONFIGS, MoVQGANTokenizer  # noqa: E402
from t2i_ds.data.prepare import Preparer, list_inputs  # noqa: E402
from t2i_ds.data.shards import ShardSample, write_shard  # noqa: E402
from t2i_ds.data.tokenizers import TextTokenizer  # noqa: E402
from t2i_ds.vocab import Vocab  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "data.jsonl"


def environment() -> dict:
    import diffusers
    import webdataset

    from t2i_ds.provenance import git_revision

    commit = git_revision()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "diffusers": diffusers.__version__, "webdataset": webdataset.__version__,
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1min": round(os.getloadavg()[0], 2)}  # other work on the machine: numbers under load are lower


def input_tar(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            for name, blob in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"a photo number {i} of a thing".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def bench_prepare(config: str, image_size: int, n_images: int, tmp: Path) -> dict:
    from diffusers import VQModel

    torch.manual_seed(0)
    model_dir = tmp / f"movq-{config}"
    VQModel(**MOVQGAN_CONFIGS[config]).save_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = MoVQGANTokenizer.load(model_dir, image_size=image_size, batch_size=64, device=device)
    raw = tmp / f"raw-{config}"
    raw.mkdir()
    input_tar(raw / "00000.tar", n_images)
    prep = Preparer(tok, TextTokenizer(), image_size, "upscale", 64, decode_workers=2)
    (unit,) = list_inputs(str(raw), 1000)
    t0 = time.perf_counter()
    samples, _ = prep.shard_samples(unit)
    write_shard(tmp / f"out-{config}" / "tokens-000000.tar", samples)
    seconds = time.perf_counter() - t0
    return {"bench": "prepare", "tokenizer": f"movqgan-{config}", "image_size": image_size, "batch": 64,
            "images": len(samples), "seconds": round(seconds, 3), "images_per_s": round(len(samples) / seconds, 2)}


def bench_loader(tmp: Path, workers: int, micro_batch: int, step_seconds: float, n_batches: int) -> dict:
    vocab = Vocab()
    shard_dir = tmp / "tokens"
    if not shard_dir.exists():
        rng = np.random.default_rng(0)
        for s in range(8):  # 8 shards x 500 paper-sized samples
            samples = [ShardSample(f"{s:03d}{i:05d}", rng.integers(0, 16384, 1024), rng.integers(0, 50277, rng.integers(5, 60)),
                                   "caption", {}) for i in range(500)]
            write_shard(shard_dir / f"tokens-{s:06d}.tar", samples)
    loader = TokenLoader(DataConfig(path=str(shard_dir), num_workers=workers), vocab, micro_batch)
    next(loader)  # worker start-up and buffer fill are not steady state
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    rate = n_batches * micro_batch / (time.perf_counter() - t0)
    needed = micro_batch / step_seconds
    t0 = time.perf_counter()
    n_indexed = len(index_shard(str(shard_dir / "tokens-000000.tar")))
    index_ms = (time.perf_counter() - t0) * 1e3
    return {"bench": "loader", "workers": workers, "micro_batch": micro_batch, "samples_per_s": round(rate, 1),
            "step_seconds": step_seconds, "needed_samples_per_s": round(needed, 1), "headroom": round(rate / needed, 1),
            "index_ms_per_shard": round(index_ms, 1), "samples_per_shard": n_indexed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny-images", type=int, default=256)
    p.add_argument("--movq-images", type=int, default=64, help="MoVQGAN-67M images (CPU: keep small)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--step-seconds", type=float, default=0.5, help="training step time the loader must keep up with")
    p.add_argument("--loader-only", action="store_true", help="skip the prepare measurements")
    args = p.parse_args()
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.loader_only:
            rows.append(bench_prepare("tiny", 16, args.tiny_images, tmp))
            rows.append(bench_prepare("67M", 256, args.movq_images, tmp))
        for workers in (0, 2):
            rows.append(bench_loader(tmp, workers, args.micro_batch, args.step_seconds, 200))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, **env}) + "\n")
    print(f"device: {env['device']}  torch {env['torch']}  diffusers {env['diffusers']}  commit {env['commit']}")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
