"""Token shards: the on-disk format `prepare` writes once and training streams (format t2i_ds.tokens.v1).

A shard is a WebDataset tar named `{prefix}-{index:06d}.tar`; one sample per source image-caption pair,
grouped by `__key__` (the source key, no '.' or '/'):

    {key}.codes.npy   numpy uint16 [tokens_per_image]   image codes in raster order, each < codebook_size
    {key}.ids.npy     numpy int32  [n]                  caption token ids, NOT truncated (the Vocab truncates)
    {key}.txt         UTF-8 caption
    {key}.json        metadata: {"key", "source_shard", "width", "height", ...} (original image size)

Codes and ids are raw tokenizer outputs: the Vocab adds its offsets (image id = text_size + code) when it
builds training sequences, so one set of shards serves any vocabulary layout.

Every finished shard has a sidecar `{prefix}-{index:06d}.stats.json` (sample count, caption-length
histogram, skip counts) and, when `prepare` skipped source records, `{prefix}-{index:06d}.skipped.jsonl`
(one `{"key", "reason", "source"}` a line); `manifest.json` summarises the directory: format, image tokenizer
(name, codebook_size, grid, image_size), text tokenizer (name/path, vocab_size), shards with sample counts,
totals, and `skipped.jsonl` merges the skip lists of all shards (`write_skipped_list`; `"shard": null` for an
input unit without one usable record, which gets a skip list and no shard).
Every file is written to a temporary name and renamed, so a killed writer never leaves a partial `.tar`
and readers only ever see finished shards; the manifest is rebuilt from the sidecars after each shard.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from t2i_ds.atomic import atomic_write_bytes

FORMAT = "t2i_ds.tokens.v1"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"  # every shard's skipped records, merged (a per-shard sidecar is the source)
MEMBERS = ("codes.npy", "ids.npy", "txt", "json")  # member suffixes of one sample, in tar order
MAX_CODE = np.iinfo(np.uint16).max  # codes are stored as uint16: codebooks up to 65,536 entries


@dataclass
class ShardSample:
    """One image-caption pair after tokenization (what `write_shard` and `TokenShardWriter` store)."""

    key: str
    codes: np.ndarray  # [tokens_per_image] integer codes in [0, codebook_size)
    caption_ids: np.ndarray  # [n] text token ids, untruncated
    caption: str
    meta: dict = field(default_factory=dict)  # source_shard, width, height, ...


@dataclass(frozen=True)
class SkippedRecord:
    """A source record that produced no sample: its key, why, and where it came from."""

    key: str
    reason: str  # e.g. "undecodable", "too_small", "no_image", "duplicate_key", "corrupt_input_tar"
    source: str = ""  # the input unit (input shard, folder/CSV chunk)

    def to_json(self) -> dict:
        return {"key": self.key, "reason": self.reason, "source": self.source}


@dataclass
class ShardStats:
    """Counters of one shard, stored in its `.stats.json` sidecar and summed into the manifest."""

    name: str
    samples: int = 0
    empty_captions: int = 0
    caption_tokens: Counter = field(default_factory=Counter)  # caption length -> count
    skipped: Counter = field(default_factory=Counter)  # reason -> count (filled by `prepare`)

    def add(self, sample: ShardSample) -> None:
        self.samples += 1
        self.empty_captions += int(len(sample.caption_ids) == 0)
        self.caption_tokens[len(sample.caption_ids)] += 1

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "empty_captions": self.empty_captions,
            "caption_tokens": {str(k): v for k, v in sorted(self.caption_tokens.items())},
            "skipped": dict(sorted(self.skipped.items())),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "ShardStats":
        return cls(
            name=d["name"],
            samples=int(d["samples"]),
            empty_captions=int(d.get("empty_captions", 0)),
            caption_tokens=Counter({int(k): int(v) for k, v in d.get("caption_tokens", {}).items()}),
            skipped=Counter({k: int(v) for k, v in d.get("skipped", {}).items()}),
        )


# ---- paths ---------------------------------------------------------------------------------------
def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_path(shard_path: str | Path) -> Path:
    """`.../tokens-000003.tar` -> `.../tokens-000003.stats.json`."""
    p = Path(shard_path)
    return p.with_name(p.name[: -len(".tar")] + ".stats.json")


def skipped_path(shard_path: str | Path) -> Path:
    """`.../tokens-000003.tar` -> `.../tokens-000003.skipped.jsonl`."""
    p = Path(shard_path)
    return p.with_name(p.name[: -len(".tar")] + ".skipped.jsonl")


def list_shards(spec: str | Path) -> list[str]:
    """Sorted shard paths from a directory (its `*.tar`), a glob, or a brace pattern `a-{000..009}.tar`.

    Several specs may be joined with '::'. Raises FileNotFoundError naming the spec when nothing matches,
    or naming the missing files of a brace pattern.
    """
    paths: list[str] = []
    for part in str(spec).split("::"):
        paths.extend(_expand_one(part))
    if not paths:
        raise FileNotFoundError(f"no token shards (*.tar) found at {str(spec)!r}")
    return paths


def _expand_one(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    if "{" in spec:
        from braceexpand import braceexpand

        paths = list(braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}")
        return paths
    return sorted(glob.glob(spec))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_token_shard(path: str | Path, members: int = 64) -> None:
    """Refuse an image tar (img2dataset's `key.jpg` + `key.txt`) given where token shards belong, naming the shard.

    Looks at the first `members` member names only; an unreadable or empty tar is left to the loader, which counts
    broken records and names the shard."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for _, m in zip(range(members), tar)]
    except (OSError, tarfile.TarError):
        return
    if any(n.endswith(".codes.npy") for n in names):
        return
    images = sorted({Path(n).suffix.lower() for n in names if n.lower().endswith(IMAGE_SUFFIXES)})
    if images:
        raise ValueError(f"{path} holds images ({', '.join(images)}), not token shards: turn the image tars into token "
                         "shards with `python -m t2i_ds.prepare` (docs/data.md) and point data.path at its --out")


# ---- writing -------------------------------------------------------------------------------------
def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _check_sample(s: ShardSample) -> tuple[np.ndarray, np.ndarray]:
    """Validate one sample and return (codes uint16 [n], ids int32 [m])."""
    if not s.key or "." in s.key or "/" in s.key:
        raise ValueError(f"sample key {s.key!r} must be non-empty without '.' or '/' (WebDataset splits on them)")
    codes = np.asarray(s.codes)
    ids = np.asarray(s.caption_ids)
    if codes.ndim != 1 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"sample {s.key!r}: codes must be a non-empty 1-D integer array, got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() > MAX_CODE:
        raise ValueError(f"sample {s.key!r}: codes must lie in [0, {MAX_CODE}], got [{codes.min()}, {codes.max()}]")
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"sample {s.key!r}: caption_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"sample {s.key!r}: caption ids out of int32 range")
    return codes.astype(np.uint16), ids.astype(np.int32)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same input gives the same shard
    tar.addfile(info, io.BytesIO(data))


def _jsonl_bytes(rows: Iterable[Mapping]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def write_shard(
    path: str | Path, samples: Iterable[ShardSample], skipped: Sequence[SkippedRecord] = ()
) -> ShardStats:
    """Write `samples` as one shard at `path` (atomically, with its sidecars); return its stats.

    `skipped`: the source records that produced no sample. Their count per reason lands in the
    `.stats.json` sidecar, the records themselves in `.skipped.jsonl` (written only when there are any).
    Sidecars are renamed into place before the tar, so a finished `.tar` always has them.
    """
    path = Path(path)
    stats = ShardStats(name=path.name, skipped=Counter(r.reason for r in skipped))
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            codes, ids = _check_sample(s)
            if s.key in seen:
                raise ValueError(f"duplicate sample key {s.key!r} in shard {path}")
            seen.add(s.key)
            meta = {"key": s.key, **s.meta}
            _add_member(tar, f"{s.key}.codes.npy", _npy_bytes(codes))
            _add_member(tar, f"{s.key}.ids.npy", _npy_bytes(ids))
            _add_member(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            _add_member(tar, f"{s.key}.json", json.dumps(meta, sort_keys=True).encode())
            stats.add(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    if skipped:
        atomic_write_bytes(skipped_path(path), _jsonl_bytes(r.to_json() for r in skipped))
    else:  # a redone shard that no longer skips anything must not keep an old list
        skipped_path(path).unlink(missing_ok=True)
    _atomic_write_json(stats_path(path), stats.to_json())
    atomic_write_bytes(path, buf.getvalue())
    return stats


class TokenShardWriter:
    """Streams samples into shards of `samples_per_shard`, numbered from `start_index`.

    `meta` goes into the manifest: at least {"image_tokenizer": {...}, "text_tokenizer": {...}}. The
    manifest is rebuilt after every finished shard; `close()` flushes the last, partial shard.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "tokens",
        samples_per_shard: int = 1000,
        meta: Mapping[str, Any] | None = None,
        start_index: int = 0,
    ):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.meta = dict(meta or {})
        self.index = start_index
        self.shards_written: list[str] = []
        self._pending: list[ShardSample] = []
        self._closed = False

    def write(self, key: str, codes, caption_ids, caption: str, meta: Mapping[str, Any] | None = None) -> None:
        if self._closed:
            raise RuntimeError("TokenShardWriter.write after close()")
        sample = ShardSample(key, np.asarray(codes), np.asarray(caption_ids), caption, dict(meta or {}))
        _check_sample(sample)  # fail at the offending call, not at flush time
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the pending samples (if any) as the next shard and refresh the manifest."""
        if not self._pending:
            return
        path = self.out_dir / shard_name(self.prefix, self.index)
        write_shard(path, self._pending)
        self.shards_written.append(str(path))
        self._pending = []
        self.index += 1
        write_manifest(self.out_dir, self.meta, prefix=self.prefix)

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # on an error, keep finished shards but do not flush a half-built one
            self.close()


# ---- manifest ------------------------------------------------------------------------------------
def write_manifest(out_dir: str | Path, meta: Mapping[str, Any], prefix: str = "tokens") -> dict:
    """Rebuild `manifest.json` from the finished shards' sidecars (atomic; safe to call from many ranks)."""
    out_dir = Path(out_dir)
    shards = [ShardStats.from_json(json.loads(stats_path(p).read_text())) for p in _finished(out_dir, prefix)]
    manifest = {
        "format": FORMAT,
        **{k: v for k, v in meta.items() if k not in ("format", "shards", "stats")},
        "shards": [{"name": s.name, "samples": s.samples} for s in shards],
        "stats": summarize(shards),
    }
    _atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def write_skipped_list(out_dir: str | Path, prefix: str = "tokens") -> tuple[Path, int]:
    """Merge the finished shards' `.skipped.jsonl` sidecars into `out_dir/skipped.jsonl` (one
    `{"shard", "key", "reason", "source"}` a line, in shard order; atomic). Returns (path, records)."""
    out_dir = Path(out_dir)
    rows = []
    finished = _finished(out_dir, prefix)
    shards = {skipped_path(p): p.name for p in finished}
    # a unit without one usable sample wrote its list and no shard ("shard": null)
    shards.update({side: None for side in out_dir.glob(f"{glob.escape(prefix)}-*.skipped.jsonl")
                   if not side.with_name(side.name.replace(".skipped.jsonl", ".tar")).exists()})
    for side in sorted(shards):
        if side.is_file():
            rows += [{"shard": shards[side], **json.loads(line)} for line in side.read_text().splitlines() if line]
    atomic_write_bytes(out_dir / SKIPPED, _jsonl_bytes(rows))
    return out_dir / SKIPPED, len(rows)


def _finished(out_dir: Path, prefix: str) -> list[Path]:
    # A tar exists only once finished (atomic rename); its sidecar was renamed before it.
    return sorted(p for p in out_dir.glob(f"{glob.escape(prefix)}-*.tar") if stats_path(p).is_file())


def summarize(shards: Iterable[ShardStats]) -> dict:
    """Totals over shards: samples, skipped per reason, empty captions, caption-length percentiles."""
    lengths: Counter = Counter()
    skipped: Counter = Counter()
    samples = empty = 0
    for s in shards:
        samples += s.samples
        empty += s.empty_captions
        lengths.update(s.caption_tokens)
        skipped.update(s.skipped)
    return {
        "samples": samples,
        "empty_captions": empty,
        "skipped": dict(sorted(skipped.items())),
        "caption_tokens": length_summary(lengths),
        "caption_length_histogram": {str(k): v for k, v in sorted(lengths.items())},
    }


def length_summary(hist: Mapping[int, int]) -> dict:
    """Mean, max and p50/p90/p99 of a {length: count} histogram ({} when empty)."""
    total = sum(hist.values())
    if total == 0:
        return {}
    keys = sorted(hist)
    cum = np.cumsum([hist[k] for k in keys])
    pct = {f"p{q}": int(keys[int(np.searchsorted(cum, q / 100 * total))]) for q in (50, 90, 99)}
    mean = sum(k * v for k, v in hist.items()) / total
    return {"mean": round(mean, 2), "max": int(keys[-1]), **pct}


def read_manifest(path: str | Path) -> dict:
    """The manifest of a shard directory (or the manifest file itself), with its format checked."""
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no {MANIFEST} at {p}")
    manifest = json.loads(p.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{p}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_shard(path: str | Path) -> list[ShardSample]:
    """All samples of one shard, strictly decoded (for tools and tests; training uses the loader)."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, suffix = m.name.partition(".")
            groups.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    out = []
    for key, g in groups.items():
        missing = [s for s in MEMBERS if s not in g]
        if missing:
            raise ValueError(f"{path}: sample {key!r} lacks members {missing}")
        codes = np.load(io.BytesIO(g["codes.npy"]), allow_pickle=False)
        ids = np.load(io.BytesIO(g["ids.npy"]), allow_pickle=False)
        meta = json.loads(g["json"])
        out.append(ShardSample(key, codes, ids, g["txt"].decode("utf-8"), meta))
    return out
