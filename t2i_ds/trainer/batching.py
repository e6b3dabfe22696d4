"""Batch sizes and the DeepSpeed config, derived in one place from the typed config.

The user's `--ds_config` JSON gives engine knobs only. This module fills the batch fields
(`train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`) and
`gradient_clipping` from the typed config, and refuses a JSON that says something else.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

from t2i_ds.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Sequences per micro-step per device, accumulation steps, and the resulting global batch."""

    micro_batch: int
    grad_accum: int
    world_size: int
    seq_len: int
    target_tokens: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def resolve_batch(tokens_per_step: int, seq_len: int, micro_batch: int, world_size: int, tolerance: float) -> BatchPlan:
    """Smallest-error whole number of accumulation steps for the token target, or a clear refusal."""
    per_micro_step = micro_batch * world_size * seq_len  # tokens of one micro-step over all ranks
    accum = max(1, round(tokens_per_step / per_micro_step))
    plan = BatchPlan(micro_batch, accum, world_size, seq_len, tokens_per_step)
    error = abs(plan.tokens_per_step - tokens_per_step) / tokens_per_step
    if error > tolerance:
        hint = max(1, math.floor(tokens_per_step / (world_size * seq_len)))
        raise ConfigError(
            f"train.tokens_per_step={tokens_per_step} cannot be met with micro_batch={micro_batch} x "
            f"world_size={world_size} x seq_len={seq_len} (closest: {plan.tokens_per_step} tokens, "
            f"{error:.0%} off, tolerance {tolerance:.0%}); use train.micro_batch<={hint} or change tokens_per_step"
        )
    return plan


def read_ds_config(path: str | Path) -> dict:
    """Load the DeepSpeed JSON with errors that name the file (and the line of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object, got {type(cfg).__name__}")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--ds_config {path}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    for section, key in (("zero_optimization", "compute_grad_norm"), ("bf16", "check_grad_overflow")):
        if cfg.get(section, {}).get(key) is False:
            raise ConfigError(f"--ds_config {path}: {section}.{key}=false turns off the skipping of non-finite steps; remove it")
    return cfg


def _fill(cfg: dict, key: str, value, source: str) -> None:
    given = cfg.get(key, "auto")
    if given not in ("auto", value):
        raise ConfigError(f"ds_config {key}={given!r} contradicts the typed config ({source} gives {value}); remove it or set \"auto\"")
    cfg[key] = value


def resolve_ds_config(user: dict, plan: BatchPlan, grad_clip: float, cuda: bool) -> dict:
    """The ds_config actually used: the user's knobs + batch numbers + precision resolved for the device."""
    cfg = copy.deepcopy(user)
    _fill(cfg, "train_micro_batch_size_per_gpu", plan.micro_batch, "train.micro_batch")
    _fill(cfg, "gradient_accumulation_steps", plan.grad_accum, "train.tokens_per_step")
    _fill(cfg, "train_batch_size", plan.global_batch, "train.tokens_per_step")
    _fill(cfg, "gradient_clipping", float(grad_clip), "optim.grad_clip")
    for prec in ("bf16", "fp16"):
        if cfg.get(prec, {}).get("enabled") == "auto":  # bf16 on GPUs, fp32 on CPU ranks
            cfg[prec]["enabled"] = bool(cuda) and prec == "bf16"
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError("ds_config must not define 'optimizer' or 'scheduler': the typed config (optim.*) owns them")
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
