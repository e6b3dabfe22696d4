"""Streaming, resumable loader of token shards: batches of {"input_ids", "targets"} for training.

Data order is a pure function of (seed, shard list, world_size, num_workers, micro_batch):

1. Epoch e orders the shards with `default_rng([seed, e])` (a permutation; with `resample`, draws with
   replacement). Every rank computes the same order.
2. The stream slot g = rank * W_loc + worker (W_loc = max(num_workers, 1); W = world_size * W_loc slots)
   reads shards order[g::W]. With fewer shards than slots, every slot reads all shards and keeps
   records r with r % W == g instead. Slots are disjoint and together cover each epoch.
3. Each slot shuffles its records with a buffer seeded by (seed, e, g), draws caption dropout and
   text mixing from (seed, e, g) as well, and cuts its stream into micro-batches. A DataLoader worker
   runs one slot and loops over epochs forever.

Resume: each batch carries its slot's position (epoch, samples consumed in that epoch, text documents
used before that epoch). `state_dict()` holds the position of the last batch the *training loop
received* from each worker (prefetched batches are not counted), so `load_state_dict` + iterating
replays every slot's epoch stream and discards the consumed prefix. Bound: with the same shard list,
seed, world_size, num_workers and micro_batch, resume is exact (0 samples repeated, 0 skipped); only
the interleaving of workers' batches may differ. The replay reads at most one slot-epoch of records.
If the layout differs, every slot restarts at the start of the least advanced saved epoch (at most
one epoch repeated) and a warning says so. Each rank saves its own state (positions are per rank).

Broken records are skipped and counted by reason in `stats`; more than `max_broken_fraction` of a
slot's records (after `min_records_for_broken_check`) raises `BrokenDataError` naming the shard.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i_ds.data.config import DataConfig
from t2i_ds.data.shards import list_shards, stats_path
from t2i_ds.vocab import Vocab

STATE_VERSION = 1


class BrokenDataError(RuntimeError):
    """Too many broken records: the data set (or one shard) is damaged, not just a stray record."""


@dataclass
class Record:
    """A validated shard record: codes int64 [image_tokens], caption ids int64 [n]."""

    key: str
    codes: np.ndarray
    caption_ids: np.ndarray


@dataclass
class SlotPosition:
    """Where one stream slot stands: `consumed` outputs of `epoch`, `text_start` text docs before it."""

    epoch: int = 0
    consumed: int = 0
    text_start: int = 0


# ---- record validation ---------------------------------------------------------------------------
class _Broken(Exception):
    """A record to skip; args[0] is the reason counted in `stats`."""


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # truncated / garbage member
        raise _Broken(f"bad_{what}") from exc


def validate(sample: dict, vocab: Vocab) -> Record:
    """A raw WebDataset sample (member suffix -> bytes) -> Record, or `_Broken(reason)`."""
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


def _expected_count(shard: str) -> int:
    """Samples the shard's sidecar says it holds (0 when there is no readable sidecar)."""
    try:
        return int(json.loads(stats_path(shard).read_text())["samples"])
    except (OSError, ValueError, KeyError):
        return 0


# ---- one stream slot -----------------------------------------------------------------------------
class _Slot:
    """The deterministic stream of one (rank, worker) slot; see the module docstring."""

    def __init__(self, cfg: DataConfig, vocab: Vocab, shards: list[str], slot: int, n_slots: int, text_tokenizer: str = ""):
        self.cfg, self.vocab, self.shards, self.text_tokenizer = cfg, vocab, shards, text_tokenizer
        self.slot, self.n_slots = slot, n_slots
        self.stats: Counter = Counter()  # records, samples, text_samples, broken:<reason>, ...
        self._last_bad_shard = ""
        self._text: _TextStream | None = None

    # -- records ---------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        n = len(self.shards)
        order = rng.integers(0, n, n) if self.cfg.resample else rng.permutation(n)
        return order.tolist()

    def _raw(self, epoch: int) -> Iterator[dict]:
        order = self.shard_order(epoch)
        by_shard = len(order) >= self.n_slots
        mine = order[self.slot :: self.n_slots] if by_shard else order
        r = 0  # record index over the epoch's shards (the sample-level split keeps r % n_slots == slot)
        for i in mine:
            for sample in self._shard_records(self.shards[i]):
                if by_shard or r % self.n_slots == self.slot:
                    yield sample
                r += 1

    def _shard_records(self, shard: str) -> Iterator[dict]:
        """Raw samples of one shard; records missing against its `.stats.json` count as corrupt_tar.

        Python's tarfile ends a stream silently at a garbage header, so the sidecar count is what
        reveals a damaged tar.
        """
        n = 0
        for sample in wds.tariterators.tarfile_samples([{"url": shard}], handler=self._on_tar_error):
            n += 1
            yield sample
        expected = _expected_count(shard)
        for _ in range(max(expected - n, 0)):
            self._count_broken("corrupt_tar", shard)

    def _on_tar_error(self, exc: Exception) -> bool:
        # A tar that cannot be read on: count it and go on with the next shard.
        shard = next((a for a in exc.args if isinstance(a, str) and a.endswith(".tar")), "?")
        self._count_broken("corrupt_tar", shard)
        return True

    def _count_broken(self, reason: str, shard: str) -> None:
        self.stats["records"] += 1
        self.stats[f"broken:{reason}"] += 1
        self._last_bad_shard = shard
        self._check_broken_fraction()

    def _check_broken_fraction(self) -> None:
        records = self.stats["records"]
        broken = sum(v for k, v in self.stats.items() if k.startswith("broken:"))
        if records >= self.cfg.min_records_for_broken_check and broken > self.cfg.max_broken_fraction * records:
            reasons = {k[7:]: v for k, v in self.stats.items() if k.startswith("broken:")}
            raise BrokenDataError(
                f"{broken} of {records} token-shard records are broken ({reasons}), more than "
                f"max_broken_fraction={self.cfg.max_broken_fraction}; last broken shard: {self._last_bad_shard}"
            )

    def records(self, epoch: int) -> Iterator[Record]:
        for sample in self._raw(epoch):
            try:
                record = validate(sample, self.vocab)
            except _Broken as b:
                self._count_broken(b.args[0], sample.get("__url__", "?"))
                continue
            self.stats["records"] += 1
            yield record

    def shuffled(self, epoch: int) -> Iterator[Record]:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.slot, 1])
        size = self.cfg.shuffle_buffer
        buf: list[Record] = []
        for rec in self.records(epoch):
            if size <= 1:
                yield rec
                continue
            buf.append(rec)
            if len(buf) >= size:  # emit a random element, keep the buffer full
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        for i in rng.permutation(len(buf)):
            yield buf[i]

    # -- samples ---------------------------------------------------------------------------------
    def samples(self, pos: SlotPosition) -> Iterator[tuple[np.ndarray, np.ndarray, SlotPosition]]:
        """(input_ids [S], targets [S], position after this sample) forever, from `pos` on."""
        epoch, skip, text_start = pos.epoch, pos.consumed, pos.text_start
        while True:
            produced, text_used = 0, [0]
            for sample in self._epoch(epoch, text_start, skip, text_used):
                produced += 1
                yield sample.input_ids, sample.targets, SlotPosition(epoch, skip + produced, text_start)
            text_start += text_used[0]
            if produced == 0 and skip == 0:
                raise RuntimeError(f"stream slot {self.slot} produced no sample in epoch {epoch}: no usable records")
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int, text_start: int, skip: int, text_used: list[int]):
        """Samples of one epoch after the first `skip`; counts the text documents drawn in text_used[0]."""
        cfg, vocab = self.cfg, self.vocab
        rng = np.random.default_rng([cfg.seed, epoch, self.slot, 2])
        records = self.shuffled(epoch)
        j = 0  # output index within the epoch
        while True:
            # Draw both decisions for every output, skipped or not, so replay stays in step.
            is_text = rng.random() < cfg.text_mix_ratio
            drop = rng.random() < cfg.caption_dropout
            if is_text:
                doc = text_start + text_used[0]
                text_used[0] += 1
                if j >= skip:
                    self.stats["text_samples"] += 1
                    yield vocab.text_only(self._text_stream().get(doc))
            else:
                rec = next(records, None)
                if rec is None:
                    return
                if j >= skip:
                    self.stats["samples"] += 1
                    self.stats["caption_dropped"] += int(drop)
                    yield self._build(rec, drop)
            j += 1

    def _build(self, rec: Record, drop: bool):
        if self.cfg.mode == "unconditional":
            return self.vocab.build(None, rec.codes)
        if self.cfg.mode == "text":
            return self.vocab.text_only(rec.caption_ids)
        sample = self.vocab.build([] if drop else rec.caption_ids, rec.codes)
        self.stats["truncated_captions"] += int(sample.caption_truncated)
        return sample

    def _text_stream(self) -> "_TextStream":
        if self._text is None:
            self._text = _TextStream(self.cfg, self.slot, self.n_slots, self.vocab, self.text_tokenizer)
        return self._text


class _TextStream:
    """Documents of `text_path` with index % n_slots == slot, cycled; tokenized on demand."""

    def __init__(self, cfg: DataConfig, slot: int, n_slots: int, vocab: Vocab, text_tokenizer: str = ""):
        from t2i_ds.data.tokenizers import TextTokenizer

        self.path = cfg.text_path
        self.tokenizer = TextTokenizer(text_tokenizer or None)
        if self.tokenizer.vocab_size > vocab.real_text_size:
            raise ValueError(
                f"text tokenizer {self.tokenizer.name} has {self.tokenizer.vocab_size} ids, more than "
                f"Vocab.real_text_size={vocab.real_text_size}"
            )
        self.slot, self.n_slots = slot, n_slots
        self.count = sum(1 for _ in self._docs())
        if self.count == 0:
            raise ValueError(f"text_path {self.path} has no document for stream slot {slot} of {n_slots}")
        self._it, self._next = self._docs(), 0

    def _docs(self) -> Iterator[str]:
        is_jsonl = self.path.endswith(".jsonl")
        with open(self.path, encoding="utf-8") as f:
            n = 0
            for line in f:
                text = json.loads(line)["text"] if is_jsonl and line.strip() else line.rstrip("\n")
                if not text.strip():
                    continue
                if n % self.n_slots == self.slot:
                    yield text
                n += 1

    def get(self, doc: int) -> list[int]:
        i = doc % self.count
        if i < self._next:  # wrapped around (or resumed behind): reopen
            self._it, self._next = self._docs(), 0
        while self._next < i:
            next(self._it)
            self._next += 1
        text = next(self._it)
        self._next += 1
        return self.tokenizer.encode(text)


# ---- the torch dataset and the loader ------------------------------------------------------------
class _SlotDataset(IterableDataset):
    """Runs the slot of (rank, DataLoader worker) and yields collated micro-batches with positions."""

    def __init__(self, cfg, vocab, shards, micro_batch, rank, world_size, start: dict[int, SlotPosition], text_tokenizer: str):
        self.cfg, self.vocab, self.shards, self.text_tokenizer = cfg, vocab, shards, text_tokenizer
        self.micro_batch, self.rank, self.world_size, self.start = micro_batch, rank, world_size, start

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        per_rank = max(self.cfg.num_workers, 1)
        slot = _Slot(self.cfg, self.vocab, self.shards, self.rank * per_rank + worker, self.world_size * per_rank,
                     self.text_tokenizer)
        stream = slot.samples(self.start.get(worker, SlotPosition()))
        while True:
            rows = [next(stream) for _ in range(self.micro_batch)]
            yield {
                "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),  # (B, S) int64
                "targets": torch.from_numpy(np.stack([r[1] for r in rows])),  # (B, S) int64
                "_worker": worker,
                "_position": rows[-1][2],
                "_stats": dict(slot.stats),
            }


class TokenLoader:
    """Infinite iterator of {"input_ids": LongTensor [B, S], "targets": LongTensor [B, S]} for one rank.

    See the module docstring for the data order, the resume bound and broken-record handling.
    `stats` sums the counters of this rank's workers as of the last batch received. `text_tokenizer`
    (tokenizer.json or a directory; empty: the NeoX default) tokenizes `cfg.text_path` for text mixing and
    must be the one the shards were made with (the run's `train.text_tokenizer`).
    """

    def __init__(self, cfg: DataConfig, vocab: Vocab, micro_batch: int, rank: int = 0, world_size: int = 1,
                 text_tokenizer: str = ""):
        if micro_batch <= 0:
            raise ValueError(f"micro_batch={micro_batch} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.vocab, self.text_tokenizer = cfg, vocab, text_tokenizer
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.shards = list_shards(cfg.path)
        self._positions: dict[int, SlotPosition] = {}
        self._worker_stats: dict[int, dict] = {}
        self._iter: Iterator | None = None

    @property
    def _layout(self) -> dict:
        return {
            "seed": self.cfg.seed,
            "shards": len(self.shards),
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "micro_batch": self.micro_batch,
            "mode": self.cfg.mode,
            "text_mix_ratio": self.cfg.text_mix_ratio,
            "caption_dropout": self.cfg.caption_dropout,
            "resample": self.cfg.resample,
        }

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
        worker = int(batch.pop("_worker"))
        self._positions[worker] = batch.pop("_position")
        self._worker_stats[worker] = batch.pop("_stats")
        return batch

    def _make_dataloader(self) -> DataLoader:
        ds = _SlotDataset(
            self.cfg, self.vocab, self.shards, self.micro_batch, self.rank, self.world_size, dict(self._positions),
            self.text_tokenizer,
        )
        n = self.cfg.num_workers
        return DataLoader(
            ds, batch_size=None, num_workers=n, persistent_workers=n > 0, prefetch_factor=2 if n > 0 else None
        )

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (save one per rank): layout + per-worker (epoch, consumed, text_start)."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "layout": self._layout,
            "positions": {str(w): vars(p).copy() for w, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (call before iterating; restarts the workers if already iterating)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        positions = {int(w): SlotPosition(**p) for w, p in state["positions"].items()}
        if state["layout"] != self._layout or state.get("rank") != self.rank:
            positions = self._restart_positions(state, positions)
        self._positions = positions
        self._worker_stats = {}
        self._iter = None

    def _restart_positions(self, state: dict, positions: dict[int, SlotPosition]) -> dict[int, SlotPosition]:
        epoch = min((p.epoch for p in positions.values()), default=0)
        text = min((p.text_start for p in positions.values()), default=0)
        warnings.warn(
            f"data layout changed since the checkpoint ({state['layout']} -> {self._layout}, rank "
            f"{state.get('rank')} -> {self.rank}): restarting every stream at the start of epoch {epoch} "
            f"(up to one epoch of data is repeated)"
        )
        return {w: SlotPosition(epoch, 0, text) for w in range(max(self.cfg.num_workers, 1))}
