"""Model hyper-parameters (open_lm's `Params`) and presets as code.

Facts from open_lm (reference/open_lm_1b.md): the released open_lm-1b is dim 2048 / 24 layers /
16 heads, LayerNorm with bias (eps 1e-5), SwiGLU with hidden 5632, untied output, and the
`head_rotary` positional embedding (a RoPE bug that rotates by head index; numerically NoPE).
Every other open_lm size at HEAD uses the correct half-split `rotary`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from t2i_ds.vocab import tiny_vocab
from t2i_kernels.names import LOSS_IMPLS  # one list: the dispatcher's (torch-free: configs load without torch)

NORM_TYPES = ("layer_norm", "gain_only_layer_norm", "rms_norm")
POS_EMBED_TYPES = ("rotary", "head_rotary", "none")


@dataclass
class ModelArgs:
    """Architecture of an open_lm decoder.

    Attributes:
        dim: model width (open_lm `hidden_dim`).
        n_layers: number of pre-norm blocks.
        n_heads: attention heads; head_dim = dim // n_heads.
        vocab_size: embedding and output rows (text + image + specials after extension).
        seq_len: maximum sequence length (rotary cache size; not a hard limit for NoPE).
        norm_type: "layer_norm" (gain + bias, open_lm `default_layer_norm`),
            "gain_only_layer_norm", or "rms_norm".
        norm_eps: epsilon of every norm (open_lm default 1e-5).
        pos_embed: "rotary" (correct half-split RoPE over positions), "head_rotary" (the released
            1B's bug: rotation by head index, attention scores unchanged) or "none".
        rotary_theta: RoPE base (open_lm hard-codes 10000).
        qk_norm: normalise the full q and k vectors (before splitting into heads), as DCLM does.
        weight_tying: share `tok_embeddings.weight` with `output.weight`.
        post_embed_norm: a norm right after the embedding (off for every 1B config).
        attn_backend: attention backend name for `t2i_ds.model.attention.attention`.
        loss_impl: output-layer loss path: "torch" (full logits), "chunked" (memory-bounded torch),
            "triton" (fused kernel), "auto" (triton on CUDA, chunked elsewhere).
    """

    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    vocab_size: int = 50_432
    seq_len: int = 2048
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-5
    pos_embed: str = "rotary"
    rotary_theta: float = 10_000.0
    qk_norm: bool = False
    weight_tying: bool = False
    post_embed_norm: bool = False
    attn_backend: str = "auto"
    loss_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for rotary")
        for name, value, allowed in (
            ("norm_type", self.norm_type, NORM_TYPES),
            ("pos_embed", self.pos_embed, POS_EMBED_TYPES),
            ("loss_impl", self.loss_impl, LOSS_IMPLS),
        ):
            if value not in allowed:
                raise ValueError(f"ModelArgs.{name}={value!r} is not one of {allowed}")
        if min(self.dim, self.n_layers, self.vocab_size, self.seq_len) <= 0:
            raise ValueError(f"ModelArgs sizes must be positive: {self}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: 8/3 * dim rounded up to a multiple of 256 (5632 for dim 2048)."""
        return 256 * ((int(2 * 4 * self.dim / 3) + 256 - 1) // 256)

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _open_lm(dim: int, n_layers: int, n_heads: int) -> Callable[[], ModelArgs]:
    return lambda: ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads)


PRESETS: dict[str, Callable[[], ModelArgs]] = {
    # A few-second model for tests (sized for t2i_ds.vocab.tiny_vocab) and the CPU demo (its run preset sets
    # vocab_size from the demo's Vocab, as every run does).
    "debug": lambda: ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tiny_vocab().size, seq_len=64),
    "demo": lambda: ModelArgs(dim=128, n_layers=4, n_heads=4, seq_len=128),
    # open_lm/model_configs at HEAD (correct rotary, LayerNorm with bias).
    "open_lm_11m": _open_lm(96, 12, 12),
    "open_lm_25m": _open_lm(192, 12, 12),
    # open_lm_87m (dim 488, 12 heads) is left out: 488 is not divisible by 12 heads.
    "open_lm_160m": _open_lm(768, 12, 12),
    "open_lm_410m": _open_lm(1024, 24, 16),
    "open_lm_830m": _open_lm(1536, 24, 16),
    "open_lm_1b_rotary": _open_lm(2048, 24, 16),
    "open_lm_3b": _open_lm(2560, 32, 32),
    "open_lm_7b": _open_lm(4096, 32, 32),
    # The released open_lm-1b checkpoint (open_lm_1b_old.json): head_rotary, i.e. effectively NoPE.
    "open_lm_1b": lambda: ModelArgs(dim=2048, n_layers=24, n_heads=16, pos_embed="head_rotary"),
}


def model_preset(name: str, **overrides) -> ModelArgs:
    """ModelArgs of a named preset, with field overrides (e.g. vocab_size from the Vocab)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
