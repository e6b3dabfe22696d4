"""Typed configuration of the training data stream (token shards written by `prepare`)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("t2i", "unconditional", "text")


@dataclass
class DataConfig:
    """What the `TokenLoader` streams and how."""

    path: str = ""
    """Token shards: a directory (its *.tar), a glob, or a brace pattern `dir/tokens-{000000..000099}.tar`;
    several joined with '::'."""

    mode: str = "t2i"
    """'t2i': `<doc> <text> caption </text> <image> codes </image> </doc>`; 'unconditional': image only;
    'text': the captions alone as `<doc> <text> caption </text> </doc>` (text-only pre-training of a
    small model, for the pre-trained vs random comparison on small data)."""

    seed: int = 0
    """Seeds the per-epoch shard order, the sample permutation, caption dropout and text mixing."""

    shuffle_window: int = 64
    """Shards whose samples are permuted together: each epoch permutes the shards, cuts them into windows of
    this many and permutes the samples inside each window (0: one permutation over the whole epoch). Memory
    per worker is ~16 bytes per sample of a window; the order never depends on ranks or workers."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""

    caption_dropout: float = 0.0
    """Probability of training a pair on an empty caption `<text> </text>`: the unconditional branch of
    classifier-free guidance (peers use 0.05-0.1)."""

    text_mix_ratio: float = 0.0
    """Fraction of training samples that are text-only (`<doc> <text> ... </text> </doc>`), drawn from
    `text_path`, against forgetting of text ability (paper Table 1)."""

    text_path: str = ""
    """Plain .txt (one document per line) or .jsonl (field "text") file of text to mix; required when
    text_mix_ratio > 0. Tokenized with the run's `train.text_tokenizer`."""

    max_broken_fraction: float = 0.01
    """Broken records (corrupt member, bad dtype/shape/range/JSON) are skipped and counted; once more than
    this fraction of a worker's records are broken (after `min_records_for_broken_check`), loading stops
    with an error naming the last broken shard."""

    min_records_for_broken_check: int = 200
    """Records a worker reads before `max_broken_fraction` is enforced (a few early bad records in a
    small sample are not evidence of a broken data set)."""

    resample: bool = False
    """Each epoch draws its shard list with replacement (seeded) instead of permuting it; order and resume stay
    deterministic, but a shard may be read twice (or not at all) in an epoch."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("DataConfig.path is empty: give a shard directory, glob or brace pattern")
        if self.mode not in MODES:
            raise ValueError(f"DataConfig.mode={self.mode!r} must be one of {MODES}")
        if self.seed < 0:
            raise ValueError(f"DataConfig.seed={self.seed} must be >= 0")
        if self.shuffle_window < 0:
            raise ValueError(f"DataConfig.shuffle_window={self.shuffle_window} must be >= 0")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers={self.num_workers} must be >= 0")
        for name in ("caption_dropout", "max_broken_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DataConfig.{name}={value} must be in [0, 1]")
        if not 0.0 <= self.text_mix_ratio < 1.0:
            raise ValueError(f"DataConfig.text_mix_ratio={self.text_mix_ratio} must be in [0, 1)")
        if self.text_mix_ratio > 0 and not self.text_path:
            raise ValueError(f"DataConfig.text_mix_ratio={self.text_mix_ratio} needs DataConfig.text_path")
        if self.mode != "t2i" and self.caption_dropout > 0:
            raise ValueError(f"DataConfig.caption_dropout applies to mode 't2i' only, not {self.mode!r}")
        if self.min_records_for_broken_check < 1:
            raise ValueError(f"DataConfig.min_records_for_broken_check={self.min_records_for_broken_check} must be >= 1")
