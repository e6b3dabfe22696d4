"""`prepare`: image-caption pairs -> token shards (format in `t2i_ds.data.shards`), once, resumably.

Inputs (`--input`):
  * WebDataset tars in img2dataset layout (`key.jpg|png|webp` + `key.txt` or `key.json` {"caption"}):
    a directory of *.tar, a glob, or a brace pattern. Input shard i -> output shard `tokens-{i:06d}.tar`.
  * a folder of images with same-name `.txt` captions, or a CSV / parquet of (image path, caption):
    sorted, cut into chunks of `--samples-per-shard`; chunk i -> output shard i.
Output shard i is a pure function of input unit i, so a killed run resumes exactly by skipping the
output shards that exist (they appear atomically); on start, the temporaries a killed writer left in the
output directory are removed (`t2i_ds.atomic.clean_stale_temporaries`). Ranks take units i with
i % world_size == rank. Each skipped source record is listed with its reason beside its shard and, merged,
in `skipped.jsonl` (t2i_ds.data.shards). A unit without one usable image writes no shard (an empty tar would be
refused by the trainer; a rerun tries the unit again), only its skip list, with a warning line; a rank none of
whose units gave a shard stops with one line (counts by reason) and a non-zero exit, no manifest written.
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds

from t2i_ds.atomic import atomic_write_bytes, clean_stale_temporaries
from t2i_ds.data.image_tokenizers import describe_image_tokenizer, load_image_tokenizer
from t2i_ds.data.images import SkipImage, load_and_prepare
from t2i_ds.data.shards import (
    MANIFEST,
    ShardSample,
    SkippedRecord,
    list_shards,
    read_manifest,
    shard_name,
    skipped_path,
    stats_path,
    write_manifest,
    write_shard,
    write_skipped_list,
)
from t2i_ds.data.tokenizers import TextTokenizer
from t2i_ds.progress import Progress

log = logging.getLogger("t2i_ds.prepare")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class RawRecord:
    """One source pair before decoding: `load()` returns the encoded image bytes."""

    key: str
    caption: str | None  # None: the source had no caption at all
    load: Callable[[], bytes]
    extra: dict = field(default_factory=dict)  # copied into the sample's json (e.g. url)


@dataclass
class InputUnit:
    """What becomes one output shard: a name (for the json metadata) and its records."""

    name: str
    records: Callable[[], Iterator[RawRecord]]


# ---- inputs ------------------------------------------------------------------------------------------
def safe_key(name: str) -> str:
    """A WebDataset-safe key: no '.' or '/' (they split keys from member suffixes)."""
    return re.sub(r"[./\\]", "_", name)


def list_inputs(spec: str, samples_per_shard: int, image_col: str = "image", caption_col: str = "caption") -> list[InputUnit]:
    p = Path(spec)
    if p.is_file() and p.suffix in (".csv", ".tsv", ".parquet"):
        return _chunk(_table_records(p, image_col, caption_col), samples_per_shard, p.name)
    if p.is_dir() and not glob.glob(os.path.join(glob.escape(spec), "*.tar")):
        return _chunk(_folder_records(p), samples_per_shard, p.name)
    try:
        tars = list_shards(spec)
    except FileNotFoundError:
        what = "does not exist" if not any(os.path.exists(part) for part in str(spec).split("::")) else "holds no input"
        raise FileNotFoundError(f"--input {spec} {what}: expected img2dataset tars (a directory, glob or brace pattern), "
                                "a folder of images with .txt captions, or a CSV/parquet") from None
    return [InputUnit(Path(t).name, _tar_reader(t)) for t in tars]


def output_dir(spec: str) -> Path:
    """The --out directory, created; refused with one line when it is a file or cannot be written."""
    out = Path(spec)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out {out} cannot be written: [Errno {e.errno}] {e.strerror}") from None
    return out


def _chunk(records: list[RawRecord], n: int, name: str) -> list[InputUnit]:
    if not records:
        raise FileNotFoundError(f"no image-caption pairs found in {name}")
    chunks = [records[i : i + n] for i in range(0, len(records), n)]
    return [InputUnit(f"{name}#{i}", (lambda c=c: iter(c))) for i, c in enumerate(chunks)]


def _folder_records(folder: Path) -> list[RawRecord]:
    images = sorted(q for q in folder.rglob("*") if q.suffix.lower().lstrip(".") in IMAGE_EXTS)
    out = []
    for img in images:
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        rel = str(img.relative_to(folder))
        out.append(RawRecord(safe_key(rel), caption, img.read_bytes, {"path": rel}))
    return out


def _table_records(path: Path, image_col: str, caption_col: str) -> list[RawRecord]:
    rows = _read_table(path)
    if rows and (image_col not in rows[0] or caption_col not in rows[0]):
        raise ValueError(f"{path}: needs columns {image_col!r} and {caption_col!r}, has {sorted(rows[0])}")
    out = []
    for i, row in enumerate(rows):
        img = Path(row[image_col])
        img = img if img.is_absolute() else path.parent / img
        out.append(RawRecord(f"{i:09d}", row[caption_col] or "", img.read_bytes, {"path": str(row[image_col])}))
    return out


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist()
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


def _tar_reader(path: str) -> Callable[[], Iterator[RawRecord]]:
    def records() -> Iterator[RawRecord]:
        errors: list[Exception] = []

        def on_error(exc: Exception) -> bool:  # a corrupt tar ends this shard; what was read is kept
            errors.append(exc)
            return False

        for s in wds.tariterators.tarfile_samples([{"url": path}], handler=on_error):
            yield _tar_record(s)
        if errors:
            yield RawRecord(safe_key(Path(path).name), None, lambda: b"", {"_error": "corrupt_input_tar"})

    return records


def _tar_record(s: dict) -> RawRecord:
    ext = next((e for e in IMAGE_EXTS if e in s), None)
    meta = {}
    if "json" in s:
        try:
            meta = json.loads(s["json"])
        except ValueError:
            meta = {}
    caption = s["txt"].decode("utf-8", "replace") if "txt" in s else meta.get("caption")
    extra = {k: meta[k] for k in ("url",) if isinstance(meta.get(k), str)}
    if ext is None:
        extra["_error"] = "no_image"
    data = s.get(ext, b"")
    return RawRecord(safe_key(s["__key__"]), caption, lambda: data, extra)


# ---- one unit -> one shard ---------------------------------------------------------------------------
@dataclass
class Prepared:
    """One decoded pair ready for the tokenizers."""

    key: str
    image: torch.Tensor  # (3, S, S) in [-1, 1]
    caption: str
    meta: dict


class Preparer:
    """Turns input units into token shards with the given tokenizers (see the module docstring)."""

    def __init__(self, image_tok, text_tok: TextTokenizer, image_size: int, small: str, batch_size: int, decode_workers: int):
        self.image_tok, self.text_tok = image_tok, text_tok
        self.image_size, self.small, self.batch_size = image_size, small, batch_size
        self.pool = ThreadPoolExecutor(max(decode_workers, 1))  # PIL decodes/resizes outside the GIL

    def _decode(self, rec: RawRecord, unit: str) -> Prepared | str:
        """A RawRecord -> Prepared, or the reason it is skipped."""
        if "_error" in rec.extra:
            return rec.extra["_error"]
        try:
            image, (w, h), mode = load_and_prepare(rec.load(), self.image_size, self.small)
        except SkipImage as s:
            return s.args[0]
        except OSError:
            return "unreadable_file"
        extra = {k: v for k, v in rec.extra.items() if not k.startswith("_")}
        meta = {"source_shard": unit, "width": w, "height": h, "mode": mode, **extra}
        return Prepared(rec.key, image, rec.caption or "", meta)

    def shard_samples(self, unit: InputUnit) -> tuple[list[ShardSample], list[SkippedRecord]]:
        """The samples of one input unit, and the records skipped with their reasons."""
        skipped: list[SkippedRecord] = []
        samples: list[ShardSample] = []
        seen: set[str] = set()
        batch: list[Prepared] = []
        for rec, item in self._decoded(unit):
            if isinstance(item, str):
                skipped.append(SkippedRecord(rec.key, item, unit.name))
                continue
            if item.key in seen:
                skipped.append(SkippedRecord(item.key, "duplicate_key", unit.name))
                continue
            seen.add(item.key)
            batch.append(item)
            if len(batch) == self.batch_size:
                samples += self._tokenize(batch)
                batch = []
        if batch:
            samples += self._tokenize(batch)
        return samples, skipped

    def _decoded(self, unit: InputUnit) -> Iterator[tuple[RawRecord, Prepared | str]]:
        # Decode a few batches at a time: pool.map submits everything it is given, and a 10k-image shard of
        # (3, 256, 256) float tensors would hold ~8 GB.
        records = unit.records()
        while chunk := list(itertools.islice(records, 4 * self.batch_size)):
            yield from zip(chunk, self.pool.map(lambda r: self._decode(r, unit.name), chunk))

    def _tokenize(self, batch: list[Prepared]) -> list[ShardSample]:
        codes = self.image_tok.encode(torch.stack([p.image for p in batch]))  # (B, T) int64
        ids = self.text_tok.encode_batch([p.caption for p in batch])
        return [
            ShardSample(p.key, c.numpy(), np.asarray(i, dtype=np.int32), p.caption, p.meta)
            for p, c, i in zip(batch, codes, ids)
        ]


# ---- input without one usable image ------------------------------------------------------------------
class NothingPrepared(ValueError):
    """None of a rank's input units gave one usable image: no shard written (the one line names the counts)."""


def _by_reason(skipped: list[SkippedRecord] | Counter) -> str:
    counts = skipped if isinstance(skipped, Counter) else Counter(r.reason for r in skipped)
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "no records"


def write_unit_without_samples(path: Path, skipped: list[SkippedRecord]) -> None:
    """A unit whose every record was skipped: its skip list beside where the shard would be (merged into
    skipped.jsonl), and no shard (nor a stale stats sidecar that would describe one)."""
    stats_path(path).unlink(missing_ok=True)
    atomic_write_bytes(skipped_path(path), b"".join(json.dumps(r.to_json(), sort_keys=True).encode() + b"\n"
                                                    for r in skipped))


def _nothing_written(out: Path, spec: str, rank: int, world: int, units: int, skipped_file: Path) -> str:
    counts: Counter = Counter()
    for line in skipped_file.read_text().splitlines():
        counts[json.loads(line)["reason"]] += 1
    who = f"rank {rank}/{world}: " if world > 1 else ""
    return (f"{who}no shard written to {out}: not one of the {sum(counts.values())} records of --input {spec} "
            f"({units} input unit{'s' if units != 1 else ''}) gave a usable image ({_by_reason(counts)}); the records "
            f"and reasons are in {skipped_file}")


# ---- the command ------------------------------------------------------------------------------------
def dist_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world-size, else env RANK/WORLD_SIZE (torchrun, deepspeed), else (0, 1)."""
    rank = rank if rank is not None else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} must be in [0, world_size={world})")
    return rank, world


def check_manifest_compatible(out: Path, meta: dict) -> None:
    """Refuse to add shards made with other tokenizers to an existing output directory."""
    if not (out / MANIFEST).is_file():
        return
    old = read_manifest(out)
    for k in ("image_tokenizer", "text_tokenizer"):
        if k in old and old[k] != meta[k]:
            raise ValueError(f"{out / MANIFEST}: {k} {old[k]} differs from this run's {meta[k]}; use a new --out")


def run(args: argparse.Namespace) -> dict:
    rank, world = dist_env(args.rank, args.world_size)
    units = list_inputs(args.input, args.samples_per_shard, args.image_col, args.caption_col)  # before --out exists
    out = output_dir(args.out)
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    image_tok = load_image_tokenizer(
        args.image_tokenizer, **({"image_size": args.image_size, "batch_size": args.batch_size, "device": device}
                                 if args.image_tokenizer.startswith("movqgan:") else {})
    )
    if image_tok.image_size != args.image_size:
        raise ValueError(f"--image-size {args.image_size} but the image tokenizer takes {image_tok.image_size} px")
    text_tok = TextTokenizer(args.text_tokenizer)
    meta = {
        "image_tokenizer": describe_image_tokenizer(image_tok, args.image_tokenizer),
        "text_tokenizer": text_tok.describe(),
        "prepare": {"input": args.input, "image_size": args.image_size, "small_images": args.small_images},
    }
    check_manifest_compatible(out, meta)
    mine = [i for i in range(len(units)) if i % world == rank]
    todo = [i for i in mine if not (out / shard_name(args.prefix, i)).exists()]  # finished shards appear atomically
    for tmp in clean_stale_temporaries(out):
        log.info("removed %s (left by a killed writer)", tmp.name)
    prep = Preparer(image_tok, text_tok, args.image_size, args.small_images, args.batch_size, args.decode_workers)
    images = 0
    t0 = time.time()
    log.info("rank %d/%d: %d of %d input units on %s, %d already done", rank, world, len(mine), len(units), device,
             len(mine) - len(todo))
    with Progress(len(mine), "prepare", "shards", rank=rank, initial=len(mine) - len(todo)) as bar:
        for i in todo:
            path = out / shard_name(args.prefix, i)
            samples, skipped = prep.shard_samples(units[i])
            if not samples:  # no empty shard: the trainer refuses one; a rerun redoes the unit
                write_unit_without_samples(path, skipped)
                log.warning("input %s: no usable image (%s): no shard written", units[i].name, _by_reason(skipped))
                bar.update(1)
                continue
            write_shard(path, samples, skipped)
            write_manifest(out, meta, prefix=args.prefix)
            images += len(samples)
            bar.set_postfix(f"{images} images, {images / max(time.time() - t0, 1e-9):.1f} images/s")
            bar.update(1)
            log.debug("shard %s: %d samples, %d skipped", path.name, len(samples), len(skipped))
    skipped_file, n_skipped = write_skipped_list(out, prefix=args.prefix)
    if mine and not any((out / shard_name(args.prefix, i)).exists() for i in mine):
        raise NothingPrepared(_nothing_written(out, args.input, rank, world, len(mine), skipped_file))
    manifest = write_manifest(out, meta, prefix=args.prefix)
    manifest["this_run"] = {"images": images, "seconds": time.time() - t0}
    manifest["skipped_list"] = {"path": str(skipped_file), "records": n_skipped}
    return manifest
