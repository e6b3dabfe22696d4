"""Freezing presets of the paper's unconditional experiment (section 3.1, Figure 6).

Which parameters stay trainable, chosen by open_lm parameter name so the same rule works on the
raw model before DeepSpeed wraps it (and on `module.`/`_orig_mod.` prefixed names):

    full                           everything (the paper's "full fine-tuning")
    embed_output                   (1) tok_embeddings + output
    embed_output_norms             (2) = (1) + every norm + positional-embedding parameters
    embed_output_norms_first_half  (3) = (2) + every parameter of layers [0, n_layers // 2)
    embed_output_norms_ffn         (4) = (2) + every feed_forward

"Every norm" is attention_norm, ffn_norm, the final norm, post_embed_norm and q_norm/k_norm when
present. open_lm's positional embeddings (rotary, head_rotary) hold only the `inv_freq` buffer and
no parameter, so for open_lm models the positional part of (2) selects nothing; the rule is kept
for models that do have a learned positional embedding (any parameter under a `pos_embed` module).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from t2i_ds.model.checkpoint import PREFIXES

_EMBED_OUTPUT = re.compile(r"^(tok_embeddings|output)\.")
_NORM = re.compile(r"(^|\.)(attention_norm|ffn_norm|norm|post_embed_norm|q_norm|k_norm)\.[^.]+$")
_POS_EMBED = re.compile(r"(^|\.)pos_embed\.")
_FFN = re.compile(r"^layers\.\d+\.feed_forward\.")
_LAYER = re.compile(r"^layers\.(\d+)\.")

FREEZE_PRESETS: dict[str, str] = {
    "full": "every parameter trainable",
    "embed_output": "(1) embedding and output layer",
    "embed_output_norms": "(2) = (1) + norms and positional embedding",
    "embed_output_norms_first_half": "(3) = (2) + the first half of the layers",
    "embed_output_norms_ffn": "(4) = (2) + the feed-forward layers",
}


@dataclass
class FreezeReport:
    """Result of `apply_freeze`: trainable and total element counts, and the trainable names."""

    preset: str
    trainable: int
    total: int
    trainable_names: list[str]

    def __str__(self) -> str:
        share = self.trainable / max(self.total, 1)
        return f"freeze={self.preset}: {self.trainable:,} of {self.total:,} parameters trainable ({share:.2%})"


def canonical_name(name: str) -> str:
    """Parameter name without wrapper prefixes (`module.` from DeepSpeed/DDP, `_orig_mod.` from compile)."""
    for prefix in PREFIXES:
        name = name.replace(prefix, "")
    return name


def n_layers_of(names: list[str]) -> int:
    """Number of blocks, read from `layers.{i}.` names."""
    ids = [int(m.group(1)) for m in map(_LAYER.match, names) if m]
    return max(ids) + 1 if ids else 0


def is_trainable(name: str, preset: str, n_layers: int) -> bool:
    """Whether the (canonical) parameter `name` is trainable under `preset`."""
    check_preset(preset)
    if preset == "full" or _EMBED_OUTPUT.match(name):
        return True
    if preset == "embed_output":
        return False
    if _NORM.search(name) or _POS_EMBED.search(name):
        return True
    if preset == "embed_output_norms_first_half":
        layer = _LAYER.match(name)
        return layer is not None and int(layer.group(1)) < n_layers // 2
    if preset == "embed_output_norms_ffn":
        return _FFN.match(name) is not None
    return False  # embed_output_norms


def check_preset(preset: str) -> None:
    if preset not in FREEZE_PRESETS:
        raise ValueError(f"unknown freeze preset {preset!r}; choose one of {list(FREEZE_PRESETS)}")


def apply_freeze(model: nn.Module, preset: str) -> FreezeReport:
    """Set `requires_grad` of every parameter by name for `preset`; returns what is trainable.

    Call it on the raw model before building the optimizer / DeepSpeed engine: the optimizer must
    be built from the `requires_grad` parameters only, so frozen ones get no state and no decay.
    """
    check_preset(preset)
    named = [(canonical_name(n), p) for n, p in model.named_parameters()]  # a tied weight appears once
    n_layers = n_layers_of([n for n, _ in named])
    names: list[str] = []
    trainable = total = 0
    for name, p in named:
        keep = is_trainable(name, preset, n_layers)
        p.requires_grad_(keep)
        numel = getattr(p, "ds_numel", p.numel())  # a parameter partitioned at construction (ZeRO-3) keeps its full size there
        total += numel
        if keep:
            trainable += numel
            names.append(name)
    return FreezeReport(preset, trainable, total, names)
