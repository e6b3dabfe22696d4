"""Building blocks of the open_lm decoder, with open_lm's module and parameter names.

Names matter: `layers.{i}.attention.in_proj.weight`, `...feed_forward.w12.weight`, etc. are the
keys of open_lm checkpoints, so they load without a mapping table. Nothing here knows about
distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2i_ds.model.args import ModelArgs
from t2i_ds.model.attention import attention, decode_attention, decode_attention_bias, use_decode_attention

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, S_past, H, D)


@dataclass
class StaticKV:
    """One layer's preallocated keys and values for generation, each (B, H, S_max, D), written in place.

    The decode loop writes the new tokens' k, v at their cache columns (`index_copy_`, no torch.cat, no
    reallocation): every step sees tensors of the same shape at the same address, which CUDA graphs need.
    Heads before positions: a prefix [:, :, :n] is what attention kernels read fastest (each head's keys
    contiguous; measured on CPU SDPA, 1.9x faster than slicing a (B, S_max, H, D) buffer).
    """

    k: torch.Tensor
    v: torch.Tensor


class RopeTable(NamedTuple):
    """cos, sin tables built once per decode: (S_max, D) by position (`rotary`), or (1, 1, H, D) (`head_rotary`)."""

    cos: torch.Tensor
    sin: torch.Tensor
    by_head: bool

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) int64 -> cos, sin broadcastable to (B, S, H, D) (a gather, no trigonometry)."""
        if self.by_head:
            return self.cos, self.sin  # (1, 1, H, D)
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, S, 1, D)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """open_lm's norm choices; parameter names `weight` (+ `bias` for layer_norm)."""
    if kind == "layer_norm":  # open_lm `default_layer_norm`, the released 1B
        return nn.LayerNorm(dim, eps=eps)
    if kind == "gain_only_layer_norm":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    if kind == "rms_norm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {kind!r}")


def trunc_normal_(t: torch.Tensor, std: float) -> None:
    """open_lm initialisation: truncated normal at +-3 std."""
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std)


InitStep = tuple[nn.Parameter, Callable[[torch.Tensor], None]]  # (parameter, fills a tensor of its shape in place)


def trunc_normal_step(p: nn.Parameter, std: float) -> InitStep:
    return p, lambda t: trunc_normal_(t, std)


def constant_step(p: nn.Parameter, value: float) -> InitStep:
    return p, lambda t: nn.init.constant_(t, value)


def apply_init(steps: list[InitStep]) -> None:
    """Run init steps in order from the global RNG (the order fixes which random numbers each parameter gets)."""
    with torch.no_grad():
        for p, fill in steps:
            fill(p)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Half-split (GPT-NeoX) convention: (x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """open_lm `rotary` (positions along the sequence) and `head_rotary` (the released 1B's bug).

    Both keep `inv_freq` as a persistent buffer because open_lm checkpoints contain it.
    head_rotary: xformers' original code rotated along dim -2 of [B, S, H, D], i.e. the head index
    is the "position", the same angle for every token; q and k of head h get the same rotation R_h,
    so (R_h q) . (R_h k) = q . k and attention scores are unchanged (effectively NoPE).
    """

    def __init__(self, head_dim: int, theta: float, by_head: bool):
        super().__init__()
        self.register_buffer("inv_freq", self.frequencies(head_dim, theta))  # (D/2,)
        self.by_head = by_head

    @staticmethod
    def frequencies(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
        """inv_freq (D/2,) fp32: theta ** (-2i / D)."""
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))

    def _cos_sin(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # t: float32 positions of any shape (...,) -> cos, sin (..., D)
        freqs = t[..., None] * self.inv_freq.to(device=t.device, dtype=torch.float32)  # (..., D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
        return emb.cos(), emb.sin()

    def table(self, length: int, n_heads: int, device: torch.device | str) -> RopeTable:
        """cos, sin for positions [0, length) (or heads [0, n_heads) with head_rotary), computed once: the same
        fp32 values `forward` computes for those positions, so a gathered row equals a recomputed one."""
        n = n_heads if self.by_head else length
        cos, sin = self._cos_sin(torch.arange(n, device=device, dtype=torch.float32))  # (n, D)
        if self.by_head:
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, H, D)
        return RopeTable(cos, sin, self.by_head)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k (B, S, H, D). Positions are `offset + arange(S)` for every row, or per-row `positions`
        (B, S) when given (left-padded generation: a row's real tokens at 0, 1, ... as if unpadded).
        head_rotary ignores both: its "position" is the head index."""
        if self.by_head:
            t = torch.arange(q.shape[2], device=q.device, dtype=torch.float32)  # (H,): position = head index
            cos, sin = self._cos_sin(t)  # (H, D)
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, H, D)
        elif positions is not None:
            cos, sin = self._cos_sin(positions.to(device=q.device, dtype=torch.float32))  # (B, S, D)
            cos, sin = cos[:, :, None], sin[:, :, None]  # (B, S, 1, D)
        else:
            t = torch.arange(offset, offset + q.shape[1], device=q.device, dtype=torch.float32)  # (S,)
            cos, sin = self._cos_sin(t)  # (S, D)
            cos, sin = cos[None, :, None], sin[None, :, None]  # (1, S, 1, D)
        return apply_rotary(q, k, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (B, S, H, D) in fp32 by cos, sin broadcastable to them; results in the input dtypes."""
    q_out = q.float() * cos + rotate_half(q.float()) * sin
    k_out = k.float() * cos + rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rotary_qk(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` of q and k stacked, qk (2, B, S, H, D) (any strides, e.g. a permuted view of the fused
    in_proj output) -> (2, B, S, H, D) contiguous, so q = out[0] and k = out[1] are contiguous: the same fp32
    elementwise math (bitwise the same values: x*cos + rotate_half(x)*sin, each product rounded, then the sum), in
    one pass over q and k (a decode step of a small model is op overhead). cos, sin as `RopeTable.at` gives them:
    (B, S, 1, D) or (1, 1, H, D)."""
    cos, sin = cos[None], sin[None]  # (1, B, S, 1, D) or (1, 1, 1, H, D): over q and k alike
    x = qk.float()
    out = rotate_half(x) * sin  # (2, B, S, H, D) contiguous (torch.cat's output)
    out += x * cos  # in place: the layout stays
    return out.to(qk.dtype)


class CustomAttn(nn.Module):
    """open_lm `CustomAttn`: fused in_proj [Wq; Wk; Wv], optional qk-norm, rotary, out_proj."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.in_proj = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.out_proj = nn.Linear(args.dim, args.dim, bias=False)
        if args.pos_embed in ("rotary", "head_rotary"):
            self.pos_embed = RotaryEmbedding(args.head_dim, args.rotary_theta, args.pos_embed == "head_rotary")
        else:
            self.pos_embed = None
        self.q_norm = make_norm(args.norm_type, args.dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = make_norm(args.norm_type, args.dim, args.norm_eps) if args.qk_norm else None
        self.backend = args.attn_backend
        self.layer_id = layer_id
        self.dim = args.dim

    def init_steps(self) -> list[InitStep]:
        std = 1.0 / math.sqrt(self.dim)
        return [trunc_normal_step(self.in_proj.weight, std),
                trunc_normal_step(self.out_proj.weight, std / math.sqrt(2 * (self.layer_id + 1)))]  # depth-scaled

    def reset_parameters(self) -> None:
        apply_init(self.init_steps())

    def forward(
        self,
        x: torch.Tensor,
        past: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """x (B, S, dim); key_padding_mask (B, S_past + S) bool over every key, True = real; positions (B, S)
        per-row rotary positions of the new tokens (None: S_past, S_past + 1, ... for every row)."""
        B, S, _ = x.shape  # (B, S, dim)
        q, k, v = self._qkv(x)  # (B, S, H, D) each
        past_len = 0 if past is None else past[0].shape[1]
        if self.pos_embed is not None:
            q, k = self.pos_embed(q, k, offset=past_len, positions=positions)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=1), torch.cat((past[1], v), dim=1)  # (B, S_past + S, H, D)
        out = attention(q, k, v, causal=True, backend=self.backend, key_padding_mask=key_padding_mask)  # (B, S, H, D)
        return self.out_proj(out.reshape(B, S, self.dim)), (k, v)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape  # (B, S, dim)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)  # 3 x (B, S, dim)
        if self.q_norm is not None:  # open_lm normalises the full vectors, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        return tuple(t.view(B, S, self.n_heads, self.head_dim) for t in (q, k, v))  # (B, S, H, D) each

    def forward_static(
        self,
        x: torch.Tensor,
        cache: StaticKV,
        index: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        key_padding_mask: torch.Tensor | None,
        kv_len: int | None,
        decode_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generation with a preallocated cache: x (B, S, dim) are the tokens at cache columns `index` (S,) int64.

        Their k, v are written into `cache` in place. kv_len = n: attend cache columns [0, n) causally, the new
        tokens being the last S of them (prefill; eager decoding); key_padding_mask (B, n). kv_len = None: one
        token (S == 1) attends the whole cache with key_padding_mask (B, S_max) marking the columns written so
        far: every step has the same shapes (torch.compile / CUDA graphs). rope: cos, sin for the new tokens.
        One new token on the CPU (`use_decode_attention`) takes the explicit-softmax decode path instead of SDPA,
        under `decode_bias` (B * H, 1, n), the key-padding mask as `decode_attention_bias` makes it once per step
        for every layer (None with a mask: made here; None without one: every column attended).
        """
        B, S, _ = x.shape  # (B, S, dim)
        if self.q_norm is None:  # q and k rotated in one go
            qkv = F.linear(x, self.in_proj.weight).view(B, S, 3, self.n_heads, self.head_dim)  # (B, S, 3, H, D)
            qk, v = qkv[:, :, :2].permute(2, 0, 1, 3, 4), qkv[:, :, 2]  # (2, B, S, H, D), (B, S, H, D) views
            if rope is not None:
                qk = apply_rotary_qk(qk, *rope)  # contiguous: q and k below too
            q, k = qk[0], qk[1]  # (B, S, H, D) each
        else:
            q, k, v = self._qkv(x)  # (B, S, H, D) each
            if rope is not None:
                q, k = apply_rotary(q, k, *rope)
        cache.k.index_copy_(2, index, k.transpose(1, 2))  # (B, H, S_max, D), written in place
        cache.v.index_copy_(2, index, v.transpose(1, 2))
        if kv_len is None and (S != 1 or key_padding_mask is None):
            raise ValueError("forward_static over the whole cache needs one new token and a key_padding_mask")
        if decode_bias is not None or (S == 1 and use_decode_attention(x, self.backend)):
            if decode_bias is None and key_padding_mask is not None:
                decode_bias = decode_attention_bias(key_padding_mask, self.n_heads, x.dtype, kv_len is not None)
            return F.linear(self._decode_attention(q, cache, decode_bias, kv_len), self.out_proj.weight)  # (B, 1, dim)
        keys, values = cache.k.transpose(1, 2), cache.v.transpose(1, 2)  # (B, S_max, H, D) views
        if kv_len is None:
            causal = False  # the mask alone says which columns exist
        else:
            keys, values, causal = keys[:, :kv_len], values[:, :kv_len], True  # (B, kv_len, H, D) views
        out = attention(q, keys, values, causal=causal, backend=self.backend, key_padding_mask=key_padding_mask)
        return F.linear(out.reshape(B, S, self.dim), self.out_proj.weight)  # (B, S, dim)

    def _decode_attention(self, q: torch.Tensor, cache: StaticKV, bias: torch.Tensor | None,
                          kv_len: int | None) -> torch.Tensor:
        """One new token per row over the cache: q (B, 1, H, D) -> (B, 1, dim). bias (B * H, 1, n) additive over
        the first n = kv_len (or S_max) columns, None = attend them all (`decode_attention_bias`)."""
        B, _, H, D = q.shape
        n = cache.k.shape[2] if kv_len is None else kv_len
        keys = cache.k[:, :, :n].reshape(B * H, n, D)  # (B * H, n, D): a view of the cache's prefix
        values = cache.v[:, :, :n].reshape(B * H, n, D)
        out = decode_attention(q.transpose(1, 2).reshape(B * H, 1, D), keys, values, bias)  # (B * H, 1, D); q
        # contiguous (apply_rotary_qk): a view. One position: (B, H, 1, D) memory is (B, 1, H, D) memory
        return out.view(B, 1, self.dim)  # (B, 1, dim)


class SwiGLU(nn.Module):
    """xformers SwiGLU as open_lm uses it: w12 = [W_gate; W_up] fused, out = w3(silu(gate) * up)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.hidden = args.ffn_hidden
        self.w12 = nn.Linear(args.dim, 2 * self.hidden, bias=False)
        self.w3 = nn.Linear(self.hidden, args.dim, bias=False)
        self.layer_id = layer_id
        self.dim = args.dim

    def init_steps(self) -> list[InitStep]:
        return [trunc_normal_step(self.w12.weight, 1.0 / math.sqrt(self.dim)),
                trunc_normal_step(self.w3.weight, 1.0 / math.sqrt(self.hidden) / math.sqrt(2 * (self.layer_id + 1)))]

    def reset_parameters(self) -> None:
        apply_init(self.init_steps())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)  # 2 x (B, S, hidden); the first half is the gate
        return self.w3(F.silu(gate) * up)  # (B, S, dim)


class Block(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = CustomAttn(layer_id, args)
        self.feed_forward = SwiGLU(layer_id, args)
        self.attention_norm = make_norm(args.norm_type, args.dim, args.norm_eps)
        self.ffn_norm = make_norm(args.norm_type, args.dim, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        past: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        a, kv = self.attention(self.attention_norm(x), past, key_padding_mask, positions)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), kv

    def forward_static(self, x, cache: StaticKV, index, rope, key_padding_mask, kv_len, decode_bias=None) -> torch.Tensor:
        """`forward` for generation with a preallocated cache (CustomAttn.forward_static). No training, no hooks:
        submodules' `forward` and the linear weights are called directly, skipping nn.Module.__call__'s dispatch
        (a few microseconds each, 7 per layer per step: a small model's decode step is made of such overheads)."""
        h = x + self.attention.forward_static(self.attention_norm.forward(x), cache, index, rope, key_padding_mask,
                                              kv_len, decode_bias)
        ffn = self.feed_forward
        gate, up = F.linear(self.ffn_norm.forward(h), ffn.w12.weight).chunk(2, dim=-1)  # 2 x (B, S, hidden)
        return h + F.linear(F.silu(gate) * up, ffn.w3.weight)  # SwiGLU.forward, inline
