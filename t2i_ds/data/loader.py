"""Resumable loader of token shards whose data order does not depend on the number of ranks or workers.

Global batch t is the same set of samples at any world size, number of DataLoader workers and split of
the batch into micro-batches, so a run resumed on another number of GPUs continues with exactly the
batches an uninterrupted run would have used. The order is a pure function of (seed, shard list and
their sample counts, mode, text_mix_ratio, caption_dropout, resample, shuffle_window):

1. Epoch layout. Epoch e orders the shards with `default_rng([seed, e])` (a permutation; with
   `resample`, draws with replacement) and cuts that order into windows of `shuffle_window` shards
   (0: the whole epoch is one window). Inside window w the samples of its shards are permuted with
   `default_rng([seed, e, w, 1])`; the epoch is the windows' permuted samples one after the other.
   Sample counts come from the `.stats.json` sidecars (a shard without one is counted by reading its
   tar headers), so the layout is known before any sample is read.
2. The global stream. Output position g = 0, 1, 2, ... (across epochs) is a text document with
   probability `text_mix_ratio`, else the next image sample; caption dropout is drawn per position too.
   The draws are counter-based per block of positions (`default_rng([seed, 2, block])`), so the
   decision at g, and the number of text positions before g, are known without replaying samples.
3. Global batch t of B = micro_batch x grad_accum x world_size rows is positions [g0 + tB, g0 + (t+1)B);
   rank r's micro-step k takes its rows [r*b*A + k*b, r*b*A + (k+1)*b) (b = micro_batch, A = grad_accum).
4. DataLoader workers: worker w builds the rank's micro-batches m with m % num_workers == w, and the
   DataLoader hands them over in order of m (its round-robin over workers); the loader checks that order.

Reading. Each rank reads only its own rows, at random positions of the window, so every sample is read
once per epoch over all ranks (no rank reads and drops another's samples). A shard's tar headers are
indexed once per worker (one pass over the headers, no data read; 16 bytes per sample kept: where the
sample's members start and end) and a sample is one seek and one read of its members. Memory per worker
is the index of the window's shards plus one window permutation (8 bytes per sample): with the default
64-shard windows of 5,000 samples that is ~8 MB whatever the data set size, which is why the order
shuffles within windows of shards rather than over all samples at once (a full permutation plus index of
a 100M-sample set would be ~2.4 GB per worker). Windows of 64 shards mix samples from 64 random shards in
every batch; shard order and window contents change every epoch.

Resume. `state_dict()` is the global position of the next step and how many micro-batches of it this rank
has received (0 at the step boundaries where the trainer checkpoints); it is the same on every rank. Same
layout: exact (0 samples repeated, 0 skipped). Another world size, worker count or micro-batch split with
the same global batch: also exact, from the step boundary. A changed data order (seed, shards, mixing,
window) continues at the same position of the new order, with a warning.

Broken records (corrupt member, wrong dtype, truncated codes, out-of-range ids, bad JSON, missing members,
unreadable tar or fewer samples than its sidecar says) are skipped and counted in `stats`; the row becomes
an all-pad row without targets, so the batch loses one sample instead of shifting every later sample to
another step or rank. More than `max_broken_fraction` of a worker's records (after
`min_records_for_broken_check`) raises `BrokenDataError` naming the shard.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i_ds.data.config import DataConfig
from t2i_ds.data.shards import list_shards, stats_path
from t2i_ds.vocab import IGNORE, Vocab

STATE_VERSION = 2
MIX_BLOCK = 1 << 16  # positions per block of text-mixing / caption-dropout draws


class BrokenDataError(RuntimeError):
    """Too many broken records: the data set (or one shard) is damaged, not just a stray record."""


@dataclass
class Record:
    """A validated shard record: codes int64 [image_tokens], caption ids int64 [n]."""

    key: str
    codes: np.ndarray
    caption_ids: np.ndarray


# ---- record validation ---------------------------------------------------------------------------
class _Broken(Exception):
    """A record to skip; args[0] is the reason counted in `stats`."""


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # truncated / garbage member
        raise _Broken(f"bad_{what}") from exc


def validate(sample: dict, vocab: Vocab) -> Record:
    """A raw sample (member suffix -> bytes, "__key__") -> Record, or `_Broken(reason)`."""
    if "codes.npy" not in sample or "ids.npy" not in sample or "json" not in sample:
        raise _Broken("missing_member")
    codes = _load_npy(sample["codes.npy"], "codes")
    if codes.dtype != np.uint16:
        raise _Broken("wrong_dtype")
    if codes.shape != (vocab.image_tokens,):
        raise _Broken("truncated_codes")
    if codes.max() >= vocab.image_size:
        raise _Broken("codes_out_of_range")
    ids = _load_npy(sample["ids.npy"], "ids")
    if ids.dtype != np.int32 or ids.ndim != 1:
        raise _Broken("wrong_dtype")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab.real_text_size):
        raise _Broken("ids_out_of_range")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Broken("bad_json") from exc
    if not isinstance(meta, dict):
        raise _Broken("bad_json")
    return Record(sample["__key__"], codes.astype(np.int64), ids.astype(np.int64))


# ---- shard index: random access into WebDataset tars ---------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's grouping: `dir/key.suffix.more` -> (`dir/key`, `suffix.more`)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


class _SpecialHeader(Exception):
    """A pax / GNU long-name header: the slow path (Python's tarfile) reads this tar."""


def _header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a 512-byte ustar header; None at the end-of-archive zeros or a garbage header
    (bad checksum), where Python's tarfile stops too."""
    if block.count(0) == 512:
        return None
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(block[:148]) + 256 + sum(block[156:]):  # checksum field counted as 8 spaces
        return None
    kind = block[156:157]
    if kind in (b"x", b"g", b"L", b"K"):
        raise _SpecialHeader
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00" and block[345:500].strip(b"\0"):  # POSIX ustar name prefix (not GNU's fields)
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, kind


def _blocks(size: int) -> int:
    return -(-size // 512) * 512


def index_shard(path: str) -> np.ndarray:
    """int64 [n, 2]: byte span [start, end) of each sample's members, in tar order (headers only are read).

    Consecutive members with the same key form one sample (as WebDataset groups them). A garbage header ends
    the index there, as Python's tarfile stops there; an unreadable tar gives an empty index. Plain ustar
    headers are parsed here (one 512-byte read and a seek per member); pax / GNU long names go through tarfile.
    """
    spans: list[list[int]] = []
    last_key = None
    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                block = f.read(512)
                head = _header(block) if len(block) == 512 else None
                if head is None:
                    break
                name, size, kind = head
                if kind in (b"0", b"\0", b"7"):  # regular file
                    key, _ = _split_name(name)
                    end = offset + 512 + size
                    if key == last_key:
                        spans[-1][1] = end
                    else:
                        spans.append([offset, end])
                        last_key = key
                offset += 512 + _blocks(size)
                f.seek(offset)
    except _SpecialHeader:
        return _index_with_tarfile(path)
    except OSError:
        pass  # what was indexed stays usable; the missing samples count as corrupt_tar
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _index_with_tarfile(path: str) -> np.ndarray:
    spans: list[list[int]] = []
    last_key = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _ = _split_name(info.name)
                end = info.offset_data + info.size
                if key == last_key:
                    spans[-1][1] = end
                else:
                    spans.append([info.offset, end])
                    last_key = key
    except (tarfile.TarError, OSError, EOFError):
        pass
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _members(span: bytes, url: str) -> dict:
    """The members of one sample's byte span -> {"__key__", "__url__", suffix: bytes}."""
    sample: dict[str, Any] = {"__url__": url}
    pos = 0
    try:
        while pos + 512 <= len(span):
            head = _header(span[pos : pos + 512])
            if head is None:
                raise _Broken("corrupt_tar")
            name, size, kind = head
            if kind in (b"0", b"\0", b"7"):
                key, suffix = _split_name(name)
                sample.setdefault("__key__", key)
                sample[suffix] = span[pos + 512 : pos + 512 + size]
            pos += 512 + _blocks(size)
    except _SpecialHeader:
        return _members_with_tarfile(span, url)
    return sample


def _members_with_tarfile(span: bytes, url: str) -> dict:
    sample: dict[str, Any] = {"__url__": url}
    with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                key, suffix = _split_name(info.name)
                sample.setdefault("__key__", key)
                sample[suffix] = tar.extractfile(info).read()
    return sample


def shard_count(path: str) -> int:
    """Samples of one shard: its `.stats.json` sidecar, else counted from the tar headers."""
    try:
        return int(json.loads(stats_path(path).read_text())["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(index_shard(path))


class _ShardReader:
    """Reads sample j of shard i by index: per-shard index and open files kept in small LRU caches."""

    def __init__(self, shards: list[str], index_cache: int):
        self.shards = shards
        self.index_cache = max(index_cache, 1)
        self._index: OrderedDict[int, np.ndarray] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()

    def _lru(self, cache: OrderedDict, key: int, make, cap: int, close=None):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = make()
        while len(cache) > cap:
            _, old = cache.popitem(last=False)
            if close is not None:
                close(old)
        return value

    def index(self, shard: int) -> np.ndarray:
        return self._lru(self._index, shard, lambda: index_shard(self.shards[shard]), self.index_cache)

    def read(self, shard: int, j: int) -> dict:
        """Raw sample j of `shard`, or `_Broken("corrupt_tar")` when the tar does not hold it."""
        idx = self.index(shard)
        if j >= len(idx):
            raise _Broken("corrupt_tar")
        start, end = (int(x) for x in idx[j])
        end = start + _blocks(end - start)  # whole tar blocks: the last member's data is padded to 512 bytes
        try:
            f = self._lru(self._files, shard, lambda: open(self.shards[shard], "rb"), 16, lambda fh: fh.close())
            f.seek(start)
            return _members(f.read(end - start), self.shards[shard])
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _Broken("corrupt_tar") from exc

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ---- the data order --------------------------------------------------------------------------------
class DataOrder:
    """Which sample, text document or caption dropout each global position g holds (module docstring, 1-2).

    Pure function of the config and the shard counts; never of ranks or workers. Lookups are cached for
    positions that increase, which is how every worker reads.
    """

    def __init__(self, cfg: DataConfig, counts: list[int]):
        self.cfg = cfg
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.sum() == 0:
            raise ValueError(f"token shards at {cfg.path!r} hold no samples")
        self._epochs: list[int] = [0]  # image index where epoch e starts (grows as epochs are visited)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, shard order, window starts
        self._window_cache: tuple[int, int, np.ndarray, np.ndarray] | None = None  # epoch, window, perm, starts
        self._text_before = [0]  # text positions before block b (grows as blocks are visited)
        self._block: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def key(self) -> dict:
        """What the order depends on (saved with the loader state, compared on resume)."""
        c = self.cfg
        return {"seed": c.seed, "shards": len(self.counts), "samples": int(self.counts.sum()), "mode": c.mode,
                "text_mix_ratio": c.text_mix_ratio, "caption_dropout": c.caption_dropout, "resample": c.resample,
                "shuffle_window": c.shuffle_window}

    # -- mixing: text positions and caption dropout ------------------------------------------------
    def _draws(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(is_text, drop, text positions before each position of the block) for one block of positions."""
        if self._block is None or self._block[0] != block:
            u = np.random.default_rng([self.cfg.seed, 2, block]).random((2, MIX_BLOCK))
            is_text = u[0] < self.cfg.text_mix_ratio
            self._block = (block, is_text, u[1] < self.cfg.caption_dropout, np.cumsum(is_text) - is_text)
        return self._block[1:]

    def _texts_before_block(self, block: int) -> int:
        while len(self._text_before) <= block:
            b = len(self._text_before) - 1
            self._text_before.append(self._text_before[-1] + int(self._draws(b)[0].sum()))
        return self._text_before[block]

    def position(self, g: int) -> tuple[bool, bool, int]:
        """(is_text, caption dropped, index): text document index if is_text, else global image index."""
        if self.cfg.text_mix_ratio == 0 and self.cfg.caption_dropout == 0:
            return False, False, g
        block, off = divmod(g, MIX_BLOCK)
        texts = self._texts_before_block(block) if self.cfg.text_mix_ratio else 0
        is_text, drop, within = self._draws(block)
        before = texts + int(within[off])
        return bool(is_text[off]), bool(drop[off]), before if is_text[off] else g - before

    # -- epochs, windows, samples ------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        n = len(self.counts)
        return rng.integers(0, n, n) if self.cfg.resample else rng.permutation(n)

    def _epoch_of(self, i: int) -> tuple[int, int]:
        """Global image index -> (epoch, index inside the epoch)."""
        if not self.cfg.resample:
            e, j = divmod(i, int(self.counts.sum()))
            return e, j
        while self._epochs[-1] <= i:  # epochs differ in size when shards are drawn with replacement
            e = len(self._epochs) - 1
            self._epochs.append(self._epochs[-1] + int(self.counts[self.shard_order(e)].sum()))
        e = int(np.searchsorted(self._epochs, i, side="right")) - 1
        return e, i - self._epochs[e]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, first in-epoch index of each window [n_windows + 1])."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = self.shard_order(epoch)
            w = self.cfg.shuffle_window or len(order)
            sizes = np.add.reduceat(self.counts[order], np.arange(0, len(order), w))
            self._epoch_cache = (epoch, order, np.concatenate([[0], np.cumsum(sizes)]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def sample(self, i: int) -> tuple[int, int]:
        """Global image index -> (shard index into the shard list, sample index inside that shard)."""
        epoch, j = self._epoch_of(i)
        order, window_starts = self._epoch(epoch)
        w = int(np.searchsorted(window_starts, j, side="right")) - 1
        if self._window_cache is None or self._window_cache[:2] != (epoch, w):
            size = self.cfg.shuffle_window or len(order)
            shards = order[w * size : (w + 1) * size]
            perm = np.random.default_rng([self.cfg.seed, epoch, w, 1]).permutation(int(self.counts[shards].sum()))
            self._window_cache = (epoch, w, perm, np.concatenate([[0], np.cumsum(self.counts[shards])]))
        _, _, perm, starts = self._window_cache
        k = int(perm[j - window_starts[w]])  # index into the window's concatenated samples
        s = int(np.searchsorted(starts, k, side="right")) - 1
        size = self.cfg.shuffle_window or len(order)
        return int(order[w * size + s]), k - int(starts[s])


# ---- one rank's micro-batches ------------------------------------------------------------------------
@dataclass(frozen=True)
class RankLayout:
    """How a global batch is split: this rank's rows of micro-step k of step t."""

    micro_batch: int
    grad_accum: int
    rank: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def rows(self, start: int, micro: int) -> range:
        """Global positions of this rank's micro-batch number `micro` counted from position `start`."""
        step, k = divmod(micro, self.grad_accum)
        first = start + step * self.global_batch + (self.rank * self.grad_accum + k) * self.micro_batch
        return range(first, first + self.micro_batch)


class _Worker:
    """Builds rows of the global stream for one DataLoader worker (reads records, counts broken ones)."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, shards: list[str], order: DataOrder, text_tokenizer: str):
        self.cfg, self.vocab, self.order, self.text_tokenizer = cfg, vocab, order, text_tokenizer
        cache = (cfg.shuffle_window or len(shards)) + 8
        self.reader = _ShardReader(shards, cache)
        self.stats: Counter = Counter()  # records, samples, text_samples, caption_dropped, broken:<reason>, ...
        self._last_bad_shard = ""
        self._text: _TextStream | None = None

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(input_ids [S], targets [S], sample id) of global position g."""
        is_text, drop, index = self.order.position(g)
        if is_text:
            self.stats["text_samples"] += 1
            s = self.vocab.text_only(self._text_stream().get(index))
            return s.input_ids, s.targets, f"text:{index}"
        shard, j = self.order.sample(index)
        try:
            record = validate(self.reader.read(shard, j), self.vocab)
        except _Broken as b:
            self._count_broken(b.args[0], self.reader.shards[shard])
            empty = np.full(self.vocab.seq_len, self.vocab.pad_id, dtype=np.int64)
            return empty, np.full(self.vocab.seq_len, IGNORE, dtype=np.int64), f"broken:{shard}:{j}"
        self.stats["records"] += 1
        self.stats["samples"] += 1
        self.stats["caption_dropped"] += int(drop)
        s = self._build(record, drop)
        return s.input_ids, s.targets, record.key

    def _build(self, rec: Record, drop: bool):
        if self.cfg.mode == "unconditional":
            return self.vocab.build(None, rec.codes)
        if self.cfg.mode == "text":
            return self.vocab.text_only(rec.caption_ids)
        sample = self.vocab.build([] if drop else rec.caption_ids, rec.codes)
        self.stats["truncated_captions"] += int(sample.caption_truncated)
        return sample

    def _count_broken(self, reason: str, shard: str) -> None:
        self.stats["records"] += 1
        self.stats[f"broken:{reason}"] += 1
        self._last_bad_shard = shard
        records = self.stats["records"]
        broken = sum(v for k, v in self.stats.items() if k.startswith("broken:"))
        if records >= self.cfg.min_records_for_broken_check and broken > self.cfg.max_broken_fraction * records:
            reasons = {k[7:]: v for k, v in self.stats.items() if k.startswith("broken:")}
            raise BrokenDataError(
                f"{broken} of {records} token-shard records are broken ({reasons}), more than "
                f"max_broken_fraction={self.cfg.max_broken_fraction}; last broken shard: {self._last_bad_shard}"
            )

    def _text_stream(self) -> "_TextStream":
        if self._text is None:
            self._text = _TextStream(self.cfg, self.vocab, self.text_tokenizer)
        return self._text


class _TextStream:
    """Documents of `text_path` (empty lines skipped), document d = line d % count; tokenized on demand."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, text_tokenizer: str = ""):
        from t2i_ds.data.tokenizers import TextTokenizer

        self.path = cfg.text_path
        self.tokenizer = TextTokenizer(text_tokenizer or None)
        if self.tokenizer.vocab_size > vocab.real_text_size:
            raise ValueError(
                f"text tokenizer {self.tokenizer.name} has {self.tokenizer.vocab_size} ids, more than "
                f"Vocab.real_text_size={vocab.real_text_size}"
            )
        self.count = sum(1 for _ in self._docs())
        if self.count == 0:
            raise ValueError(f"text_path {self.path} has no document")
        self._it, self._next = self._docs(), 0

    def _docs(self) -> Iterator[str]:
        is_jsonl = self.path.endswith(".jsonl")
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"] if is_jsonl and line.strip() else line.rstrip("\n")
                if text.strip():
                    yield text

    def get(self, doc: int) -> list[int]:
        """Documents are asked for in increasing order by each worker: a forward scan, reopened on wrap."""
        i = doc % self.count
        if i < self._next:
            self._it, self._next = self._docs(), 0
        while self._next < i:
            next(self._it)
            self._next += 1
        text = next(self._it)
        self._next += 1
        return self.tokenizer.encode(text)


# ---- the torch dataset and the loader ------------------------------------------------------------
class _RankDataset(IterableDataset):
    """This rank's micro-batches from (start position, start micro-batch), split over DataLoader workers."""

    def __init__(self, cfg, vocab, shards, order: DataOrder, layout: RankLayout, start: int, micro0: int,
                 text_tokenizer: str):
        self.cfg, self.vocab, self.shards, self.order = cfg, vocab, shards, order
        self.layout, self.start, self.micro0, self.text_tokenizer = layout, start, micro0, text_tokenizer

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        w = _Worker(self.cfg, self.vocab, self.shards, self.order, self.text_tokenizer)
        m = self.micro0 + worker
        while True:
            rows = [w.row(g) for g in self.layout.rows(self.start, m)]
            yield {
                "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),  # (B, S) int64
                "targets": torch.from_numpy(np.stack([r[1] for r in rows])),  # (B, S) int64
                "_keys": [r[2] for r in rows],
                "_micro": m,
                "_worker": worker,
                "_stats": dict(w.stats),
            }
            m += n_workers


class TokenLoader:
    """Infinite iterator of {"input_ids": LongTensor [B, S], "targets": LongTensor [B, S]} for one rank.

    See the module docstring for the data order, the resume bound and broken-record handling.
    `stats` sums the counters of this rank's workers as of the last batch received; `last_keys` holds
    the sample ids of the last micro-batch (image: the shard key; text: "text:<doc>"; broken: "broken:...").
    `text_tokenizer` (tokenizer.json or a directory; empty: the NeoX default) tokenizes `cfg.text_path` for
    text mixing and must be the one the shards were made with (the run's `train.text_tokenizer`).
    `grad_accum`: micro-batches per optimizer step on each rank (the global batch is
    micro_batch x grad_accum x world_size rows).
    """

    def __init__(self, cfg: DataConfig, vocab: Vocab, micro_batch: int, rank: int = 0, world_size: int = 1,
                 text_tokenizer: str = "", grad_accum: int = 1):
        if micro_batch <= 0 or grad_accum <= 0:
            raise ValueError(f"micro_batch={micro_batch} and grad_accum={grad_accum} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.vocab, self.text_tokenizer = cfg, vocab, text_tokenizer
        self.layout = RankLayout(micro_batch, grad_accum, rank, world_size)
        self.shards = list_shards(cfg.path)
        self.order = DataOrder(cfg, [shard_count(s) for s in self.shards])
        self._start, self._micro0 = 0, 0  # where this iteration started: step position, micro-batches into it
        self._received = 0  # micro-batches received since then
        self._worker_stats: dict[int, dict] = {}
        self._iter: Iterator | None = None
        self.last_keys: list[str] = []

    @property
    def stats(self) -> Counter:
        total: Counter = Counter()
        for s in self._worker_stats.values():
            total.update(s)
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._make_dataloader())
        batch = next(self._iter)
        expected = self._micro0 + self._received
        if batch.pop("_micro") != expected:  # the DataLoader's round-robin over workers keeps this order
            raise RuntimeError(f"data loader returned micro-batch out of order (expected {expected})")
        self._received += 1
        self._worker_stats[int(batch.pop("_worker"))] = batch.pop("_stats")
        self.last_keys = batch.pop("_keys")
        return batch

    def _make_dataloader(self) -> DataLoader:
        ds = _RankDataset(self.cfg, self.vocab, self.shards, self.order, self.layout, self._start, self._micro0,
                          self.text_tokenizer)
        n = self.cfg.num_workers
        return DataLoader(
            ds, batch_size=None, num_workers=n, persistent_workers=n > 0, prefetch_factor=2 if n > 0 else None
        )

    def _position(self) -> tuple[int, int]:
        """(global position of the step in progress, micro-batches of it this rank has received)."""
        steps, micro = divmod(self._micro0 + self._received, self.layout.grad_accum)
        return self._start + steps * self.layout.global_batch, micro

    def state_dict(self) -> dict[str, Any]:
        """The global position (identical on every rank at step boundaries) and the order it refers to."""
        position, micro = self._position()
        layout = {k: getattr(self.layout, k) for k in ("micro_batch", "grad_accum", "rank", "world_size")}
        return {"version": STATE_VERSION, "position": position, "micro": micro, "order": self.order.key,
                "layout": {**layout, "num_workers": self.cfg.num_workers}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (call before iterating; restarts the workers if already iterating)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION} "
                             "(a checkpoint from before the world-size-independent order: resume with "
                             "train.resume=never and init.mode=pretrained from exported weights)")
        position, micro = int(state["position"]), int(state["micro"])
        if state["order"] != self.order.key:
            warnings.warn(f"data order changed since the checkpoint ({state['order']} -> {self.order.key}): "
                          f"continuing at global position {position} of the new order")
        same_split = {k: state["layout"][k] for k in ("micro_batch", "grad_accum", "rank", "world_size")} == {
            k: getattr(self.layout, k) for k in ("micro_batch", "grad_accum", "rank", "world_size")}
        if micro and not same_split:
            warnings.warn(f"checkpoint taken {micro} micro-batches into a step with another batch split: "
                          f"restarting that step at global position {position}")
            micro = 0
        self._start, self._micro0, self._received = position, micro, 0
        self._worker_stats = {}
        self._iter = None
