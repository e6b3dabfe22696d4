"""Typed run configuration: dataclasses with documented, validated fields; presets as code.

The DeepSpeed JSON (`--ds_config`) carries only engine knobs (ZeRO stage, precision, offload).
Batch numbers (micro-batch, gradient accumulation, train_batch_size) are derived from this config
and the world size in one place, `t2i_ds.trainer.batching.resolve_batch`.

Command line: `--preset NAME` picks a preset, `--set section.field=value` overrides any field
(values parsed as JSON where possible, e.g. `--set optim.lr=1e-4 --set data.path=/shards`). Every value is
converted to its field's declared type or refused with one line naming the field, the value and the type
(`train.steps=2.5`, `optim.lr=abc`), then each section validates its ranges; an option the chosen mode
would ignore (`data.*` with `train.data_source=synthetic`) is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from t2i_ds.data.config import DataConfig
from t2i_ds.model.args import PRESETS as MODEL_PRESETS
from t2i_ds.vocab import Vocab, tiny_vocab


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the field and the value."""


@dataclass
class VocabConfig:
    """Sizes of the id ranges (see t2i_ds.vocab.Vocab, which owns the defaults: the paper's)."""

    text_size: int = Vocab.text_size
    """Text rows (open_lm's padded NeoX table)."""
    image_size: int = Vocab.image_size
    """Image codebook size (MoVQGAN)."""
    image_tokens: int = Vocab.image_tokens
    """Tokens per image (32 x 32 grid)."""
    seq_len: int = Vocab.seq_len
    """Model input length of one sample."""
    pad_id: int = Vocab.pad_id
    """Input id of padding (never a target)."""
    real_text_size: int = Vocab.real_text_size
    """Ids the text tokenizer can produce."""

    def __post_init__(self) -> None:
        try:
            self.build()
        except ValueError as e:
            raise ConfigError(f"vocab: {e}") from None

    def build(self) -> Vocab:
        return Vocab(**dataclasses.asdict(self))


@dataclass
class ModelConfig:
    """Which architecture; `overrides` patches ModelArgs fields (vocab_size always comes from the Vocab)."""

    preset: str = "open_lm_1b"
    """A name from t2i_ds.model.args.PRESETS."""
    overrides: dict = field(default_factory=dict)
    """ModelArgs fields to change, e.g. {"attn_backend": "triton", "loss_impl": "chunked"}."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (activation checkpointing)."""
    compile: bool = False
    """torch.compile the model before DeepSpeed wraps it."""

    def __post_init__(self) -> None:
        from t2i_ds.model.args import ModelArgs

        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} is unknown; choose one of {sorted(MODEL_PRESETS)}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"model.overrides={self.overrides!r} must be a JSON object of ModelArgs fields")
        hints = typing.get_type_hints(ModelArgs)
        for key, value in list(self.overrides.items()):
            if key not in hints or key == "vocab_size":  # vocab_size always comes from the Vocab
                allowed = sorted(k for k in hints if k != "vocab_size")
                raise ConfigError(f"model.overrides.{key} is not a ModelArgs field; fields are {allowed}")
            self.overrides[key] = coerce(f"model.overrides.{key}", value, hints[key])


@dataclass
class InitConfig:
    """How the weights start (paper: pre-trained open_lm-1b vs random init of the same architecture)."""

    mode: str = "random"
    """'random' (open_lm init) or 'pretrained' (an open_lm checkpoint, vocabulary extended)."""
    checkpoint: str = ""
    """open_lm checkpoint (.pt with "state_dict", bare state dict, or .safetensors) for 'pretrained'."""
    new_rows: str = "random"
    """Init of the extended rows: 'random' (open_lm's embedding init), 'mean' (mean of the old rows),
    or 'aligned' (image rows from `python -m t2i_ds.paper.align`)."""
    aligned_rows: str = ""
    """aligned_rows.safetensors written by the alignment command, for new_rows='aligned'."""
    seed: int = 0
    """Seed of the model init and of the new rows."""

    def __post_init__(self) -> None:
        if self.mode not in ("random", "pretrained"):
            raise ConfigError(f"init.mode={self.mode!r} must be 'random' or 'pretrained'")
        if self.new_rows not in ("random", "mean", "aligned"):
            raise ConfigError(f"init.new_rows={self.new_rows!r} must be 'random', 'mean' or 'aligned'")
        if self.mode == "pretrained" and not self.checkpoint:
            raise ConfigError("init.mode='pretrained' needs init.checkpoint")
        if self.new_rows == "aligned" and not self.aligned_rows:
            raise ConfigError("init.new_rows='aligned' needs init.aligned_rows")
        if self.mode == "random" and (self.checkpoint or self.new_rows != "random"):
            raise ConfigError("init.checkpoint and init.new_rows are read only with init.mode='pretrained' "
                              f"(got checkpoint={self.checkpoint!r}, new_rows={self.new_rows!r} with mode='random')")
        if self.aligned_rows and self.new_rows != "aligned":
            raise ConfigError(f"init.aligned_rows is read only with init.new_rows='aligned', not {self.new_rows!r}")
        _require(self.seed >= 0, "init.seed", self.seed, ">= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (paper: peak 3e-4, 2K warm-up)."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (open_lm-1b: 3e-5 / 1e-3 ~ 0.03; 0.1 is common)."""
    warmup_steps: int = 2_000
    """Linear warm-up steps."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (open_lm applies it to every parameter)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.eps > 0, "optim.eps", self.eps, "> 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")


@dataclass
class TrainConfig:
    """Length of the run, batch target, logging and checkpoint cadence."""

    tokens_per_step: int = 1_048_576
    """Target tokens per optimizer step, global (paper: 1M). Rounded to whole sequences and to a
    multiple of micro_batch x world size; refused when that misses by more than batch_tolerance."""
    micro_batch: int = 8
    """Sequences per device per micro-step."""
    batch_tolerance: float = 0.1
    """Largest accepted relative difference between achieved and target tokens per step."""
    total_tokens: int = 100_000_000_000
    """Training length in tokens (paper: 100B); used only when `steps` is null."""
    steps: int | None = None
    """Optimizer steps (>= 1); null derives them from total_tokens // tokens_per_step (said in the log)."""
    seed: int = 0
    """Seed of data order and sampling (the model init has its own in init.seed)."""
    run_dir: str = "runs/default"
    """Directory of logs, checkpoints, the resolved config and the git revision."""
    log_every: int = 10
    """Steps between metric logs (the metrics' only host-device sync; the stop-signal agreement of
    `signal_check_every` is the loop's other one)."""
    ckpt_every: int = 1_000
    """Steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)."""
    save_final: bool = True
    """Write a checkpoint when training ends (false: throughput benchmarks, where open_lm-1b's would be ~20 GB)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in run_dir/checkpoints if any), 'never', or a path."""
    probe_every: int = 0
    """Steps between text probes (forgetting, paper Table 1); 0 disables."""
    probe_heldout: str = ""
    """Plain-text file whose text the probes' held-out loss is measured on; empty: the shipped
    t2i_ds/assets/heldout_text.txt."""
    text_tokenizer: str = ""
    """The text tokenizer the shards were made with (tokenizer.json or a directory): for text mixing
    (data.text_path), probes, samples and generation; empty: the NeoX BPE default."""
    sample_every: int = 0
    """Steps between image samples written to TensorBoard; 0 disables."""
    image_tokenizer: str = ""
    """Image tokenizer spec for samples, e.g. 'movqgan:/path' or 'demo:/path'."""
    sample_captions: tuple = ()
    """Captions drawn at each sample interval."""
    sample_cfg_scale: float = 3.0
    """Classifier-free guidance scale of those samples (0: plain conditional sampling)."""
    data_source: str = "shards"
    """'shards' (token shards, see data.*) or 'synthetic' (deterministic random sequences: throughput
    benchmarks and golden-loss tests; identical global batches at any world size)."""
    freeze: str = "full"
    """Freezing preset (paper section 3.1): full, embed_output, embed_output_norms,
    embed_output_norms_first_half, embed_output_norms_ffn."""
    stop_after_steps: int = 0
    """End this invocation (with a checkpoint) after this many steps; the schedule still spans
    `steps`. For time-limited allocations: resume continues the same run. 0 disables."""
    signal_check_every: int = 10
    """Steps between the cross-rank agreement on a received SIGTERM/SIGINT (a tiny all-reduce)."""
    record_samples: bool = False
    """Write the sample ids of every step, per rank, to run_dir/samples/rank_NNNNN.jsonl (checks of the data
    order, e.g. across a resume at another world size)."""
    max_consecutive_skips: int = 5
    """A step whose global gradient norm is not finite is skipped (no update, no scheduler advance, its data
    consumed); after this many skipped steps in a row the run stops, naming the last good checkpoint."""
    collective_timeout_s: float = 300.0
    """Seconds a rank waits for its peers: passed to torch.distributed's init (through DeepSpeed), so the process
    group must form within it and every gloo or NCCL collective fails after it; the heartbeat watchdog ends the
    run when a rank's heartbeat stops for this long (a hung node), naming the node (t2i_ds.trainer.watchdog).
    Keep it above the longest wait of one rank for another (a checkpoint save, a universal conversion)."""

    def __post_init__(self) -> None:
        self.sample_captions = tuple(self.sample_captions)
        _require(self.tokens_per_step > 0, "train.tokens_per_step", self.tokens_per_step, "> 0")
        _require(self.micro_batch > 0, "train.micro_batch", self.micro_batch, "> 0")
        _require(0 <= self.batch_tolerance < 1, "train.batch_tolerance", self.batch_tolerance, "in [0, 1)")
        _require(self.total_tokens > 0, "train.total_tokens", self.total_tokens, "> 0")
        _require(self.steps is None or self.steps >= 1, "train.steps", self.steps,
                 ">= 1 (or null: derived from train.total_tokens)")
        _require(self.seed >= 0, "train.seed", self.seed, ">= 0")
        _require(bool(self.run_dir), "train.run_dir", self.run_dir, "a directory")
        for name in ("log_every", "keep_last", "signal_check_every", "max_consecutive_skips"):
            _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), ">= 1")
        for name in ("ckpt_every", "probe_every", "sample_every", "stop_after_steps"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0 (0 disables)")
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s", self.collective_timeout_s, "> 0 seconds")
        _require(self.sample_cfg_scale >= 0, "train.sample_cfg_scale", self.sample_cfg_scale, ">= 0")
        _require(bool(self.resume), "train.resume", self.resume, "'auto', 'never' or a checkpoint directory")
        if not all(isinstance(c, str) for c in self.sample_captions):
            raise ConfigError(f"train.sample_captions={list(self.sample_captions)!r} must be a list of strings")
        if self.sample_every and not (self.image_tokenizer and self.sample_captions):
            raise ConfigError("train.sample_every needs train.image_tokenizer and train.sample_captions")
        if self.data_source not in ("shards", "synthetic"):
            raise ConfigError(f"train.data_source={self.data_source!r} must be 'shards' or 'synthetic'")
        from t2i_ds.model.freeze import FREEZE_PRESETS

        if self.freeze not in FREEZE_PRESETS:
            raise ConfigError(f"train.freeze={self.freeze!r} is not one of {list(FREEZE_PRESETS)}")


@dataclass
class Config:
    """One training run."""

    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig | None = None
    """Token shards to stream; required when train.data_source == 'shards', refused with 'synthetic'."""

    def __post_init__(self) -> None:
        if self.train.data_source == "synthetic" and self.data is not None:
            raise ConfigError(f"data.path={self.data.path!r} is ignored with train.data_source='synthetic': "
                              "drop the data.* settings, or set train.data_source=shards to train on them")

    def require_data(self, preset: str) -> None:
        """Refuse a shards run without shards, with the line that says how to give them (checked by the train
        command after the overrides, so a preset may leave data.path for the user to set)."""
        if self.train.data_source == "shards" and self.data is None:
            raise ConfigError(f"data.path is not set: preset {preset!r} streams token shards; make them with "
                              "`python -m t2i_ds.prepare` (docs/data.md) and pass --set data.path=DIR "
                              "(or --preset debug: synthetic data)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- presets ---------------------------------------------------------------------------------


def _paper(**train) -> Config:
    """The paper's recipe: open_lm-1b shape, 1M-token steps, 100B tokens, AdamW 3e-4, 2K warm-up."""
    data = None  # the user's token shards: --set data.path=DIR (the train command says so when missing)
    model = ModelConfig(preset="open_lm_1b", grad_checkpointing=True)
    return Config(model=model, train=TrainConfig(**train), data=data)


def _debug() -> Config:
    """Seconds on a CPU: the debug model on deterministic synthetic sequences."""
    vocab = VocabConfig(**dataclasses.asdict(tiny_vocab()))
    return Config(
        vocab=vocab,
        model=ModelConfig(preset="debug", overrides={"loss_impl": "torch"}),  # the reference loss path
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        train=TrainConfig(tokens_per_step=4 * vocab.seq_len, micro_batch=2, steps=6, log_every=1, ckpt_every=0,
                          data_source="synthetic", run_dir="runs/debug"),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "debug": _debug,
    "paper_t2i": lambda: _paper(),
    "paper_synthetic": lambda: _paper(data_source="synthetic"),
}


def register_preset(name: str, fn: Callable[[], Config]) -> None:
    PRESETS[name] = fn


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---- values: declared types and ranges ------------------------------------------------------


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {rule}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a JSON list", list: "a JSON list", dict: "a JSON object", type(None): "null"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` (parsed JSON, or a bare string) as the declared type `tp`, or ConfigError naming key, value, type.

    Integral floats are accepted for integers (`1e3`), integers for floats; nothing else is converted silently.
    """
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return coerce(key, value, a)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}={value!r} is not {_type_name(tp)}")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) or (isinstance(v, float) and v.is_integer()),
        float: lambda v: isinstance(v, (int, float)),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }.get(tp)
    if ok is None:
        return value
    if (isinstance(value, bool) and tp is not bool) or not ok(value):
        raise ConfigError(f"{key}={value!r} is not {_type_name(tp)}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    return {int: int, float: float, tuple: tuple}.get(tp, lambda v: v)(value)


def _parse_value(text: str, tp: Any) -> Any:
    """The text after `=`: JSON, except that a string field takes the text as written (`data.path=123`)."""
    takes_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    if takes_str and not text.startswith('"'):
        return None if text == "null" and type(None) in typing.get_args(tp) else text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: the field's type decides (and names it when it does not fit)


_SECTIONS = {"vocab": VocabConfig, "model": ModelConfig, "init": InitConfig, "optim": OptimConfig,
             "train": TrainConfig, "data": DataConfig}


def _field_type(parts: list[str]) -> Any:
    """Declared type of `section.field` (model.overrides.X: the ModelArgs field's); None when unknown."""
    if len(parts) == 2 and parts[0] in _SECTIONS:
        return typing.get_type_hints(_SECTIONS[parts[0]]).get(parts[1])
    if len(parts) == 3 and parts[:2] == ["model", "overrides"]:
        from t2i_ds.model.args import ModelArgs

        return typing.get_type_hints(ModelArgs).get(parts[2])
    return None


# ---- overrides -------------------------------------------------------------------------------


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` overrides (each converted to the field's type) and re-validate every section."""
    raw = cfg.to_dict()
    touched_data = False
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            if p == "data" and node.get("data") is None:  # start from DataConfig's defaults
                node["data"] = {f.name: f.default for f in dataclasses.fields(DataConfig)}
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {key!r}: no section {p!r}")
            node = node[p]
        if key in MOVED:
            raise ConfigError(f"override {key!r}: the field is now {MOVED[key]} (--set {MOVED[key]}={value})")
        if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "overrides"):
            raise ConfigError(f"override {key!r}: unknown field {parts[-1]!r}; fields are {sorted(node)}")
        tp = _field_type(parts)
        node[parts[-1]] = _parse_value(value, tp) if tp is not None else _parse_value(value, Any)
        if tp is not None:
            node[parts[-1]] = coerce(key, node[parts[-1]], tp)
        touched_data |= parts[0] == "data"
    if raw["train"].get("data_source") == "synthetic" and not touched_data:
        raw["data"] = None  # a shards preset switched to synthetic data: its data section is not the user's choice
    return from_dict(raw)


MOVED = {"data.text_tokenizer": "train.text_tokenizer"}  # old field -> its one home now


def _migrate(raw: dict) -> dict:
    """A config.json written before a field moved: its value goes to the new home; two different values are
    an error (which tokenizer made the shards is not ours to guess)."""
    for old, new in MOVED.items():
        (old_sec, old_field), (new_sec, new_field) = old.split("."), new.split(".")
        if not isinstance(raw.get(old_sec), dict) or old_field not in raw[old_sec]:
            continue
        value = raw[old_sec][old_field]
        current = raw.get(new_sec, {}).get(new_field, "")
        if value and current and value != current:
            raise ConfigError(f"{old}={value!r} and {new}={current!r} differ; {old} was merged into {new}: "
                              f"keep the one the shards were made with as {new}")
        raw = {**raw, old_sec: {k: v for k, v in raw[old_sec].items() if k != old_field},
               new_sec: {**raw.get(new_sec, {}), new_field: current or value}}
    return raw


RETIRED_DATA_FIELDS = ("shuffle_buffer",)  # in config.json of older runs; the order now shuffles by shard window


def _section(name: str, cls: type, values: Any):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a JSON object, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; fields are {sorted(hints)}")
    return cls(**{k: coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def from_dict(raw: dict) -> Config:
    """Rebuild (and so re-validate) a Config from plain data; unknown fields and wrong types are errors (moved
    ones migrate)."""
    raw = _migrate(raw)
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}")
    kwargs = {}
    try:
        for name, cls in _SECTIONS.items():
            if name == "data":
                data = {k: v for k, v in (raw.get("data") or {}).items() if k not in RETIRED_DATA_FIELDS}
                kwargs["data"] = None if not data else _section("data", DataConfig, data)
            else:
                kwargs[name] = _section(name, cls, raw.get(name, {}))
        return Config(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
