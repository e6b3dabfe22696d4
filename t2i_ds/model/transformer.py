"""open_lm `Transformer`: embedding, pre-norm blocks, final norm, LM head (loss in the head).

    x = tok_embeddings(ids)                  # (B, S, dim)
    x = post_embed_norm(x)                   # identity for every 1B config
    for layer in layers: x = layer(x)        # (B, S, dim)
    x = norm(x)
    out = output(x, targets)                 # logits (B, S, V) or a LossOutput

No DeepSpeed import here: t2i_ds.trainer.parallelize wraps the model for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from t2i_ds.model.args import ModelArgs
from t2i_ds.model.attention import decode_attention_bias, use_decode_attention
from t2i_ds.model.head import LMHead, LossOutput
from t2i_ds.model.layers import (
    Block, InitStep, KVCache, RopeTable, StaticKV, apply_init, constant_step, make_norm, trunc_normal_step,
)


@dataclass
class DecodeCache:
    """Everything a decode needs allocated once: per-layer K/V of (B, H, S_max, D) and rotary tables."""

    layers: list[StaticKV]
    rope: list[RopeTable | None]  # per layer; layers with equal `inv_freq` (open_lm: every layer) share one table
    max_len: int


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, modality_bounds: tuple[int, ...] = (), init: bool = True):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.post_embed_norm = make_norm(args.norm_type, args.dim, args.norm_eps) if args.post_embed_norm else nn.Identity()
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = make_norm(args.norm_type, args.dim, args.norm_eps)
        self.output = LMHead(args.dim, args.vocab_size, modality_bounds, args.loss_impl)
        if args.weight_tying:  # as open_lm: the embedding shares the output's Parameter
            self.tok_embeddings.weight = self.output.weight
        self.grad_checkpointing = False
        if init:
            self.reset_parameters()

    def init_steps(self) -> list[InitStep]:
        """open_lm init as (parameter, fill) steps in the order they draw random numbers: truncated normal,
        std 1/sqrt(dim); output projections depth-scaled; norms gain 1, bias 0.

        A caller that holds the parameters elsewhere (ZeRO-3 partitions them while the model is built, see
        t2i_ds.trainer.parallelize) runs these steps itself, one parameter at a time, in this order.
        """
        std = 1.0 / math.sqrt(self.args.dim)
        steps = [trunc_normal_step(self.tok_embeddings.weight, std)]
        if not self.args.weight_tying:
            steps.append(trunc_normal_step(self.output.weight, std))
        for layer in self.layers:
            steps += layer.attention.init_steps() + layer.feed_forward.init_steps()
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                steps.append(constant_step(m.weight, 1.0))
                if getattr(m, "bias", None) is not None:  # nn.RMSNorm has no bias attribute
                    steps.append(constant_step(m.bias, 0.0))
        return steps

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Run `init_steps` (not on the meta device)."""
        if self.tok_embeddings.weight.is_meta:
            return
        apply_init(self.init_steps())

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        past: list[KVCache] | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Final-norm hidden states (B, S, dim) and the per-layer KV caches.

        key_padding_mask (B, S_past + S) bool, True = a real token, covers the cached keys and the new ones
        (batched generation with left-padded prompts); padded keys are never attended. positions (B, S): the
        rotary positions of the new tokens; by default `padded_positions(key_padding_mask)` with a mask (each
        row's real tokens at 0, 1, ... as if unpadded), S_past + arange(S) without one. RoPE scores depend on
        position differences only, so a row shifted by its pads would give the same logits in exact arithmetic;
        the per-row offsets make the rotated q/k and the cached keys those of the unpadded row (the same fp32
        angles, no drift with long pads), so batched and single-row sampling agree to rounding.
        """
        if positions is None and key_padding_mask is not None:
            positions = padded_positions(key_padding_mask)[:, -input_ids.shape[1] :]  # (B, S)
        x = self.post_embed_norm(self.tok_embeddings(input_ids))  # (B, S, dim)
        caches: list[KVCache] = []
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if self.grad_checkpointing and self.training and layer_past is None:
                x, kv = torch.utils.checkpoint.checkpoint(
                    layer, x, None, key_padding_mask, positions, use_reentrant=False
                )
            else:
                x, kv = layer(x, layer_past, key_padding_mask, positions)
            caches.append(kv)
        return self.norm(x), caches

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor | LossOutput:
        """Logits (B, S, V) in fp32 without targets; per-modality loss sums and counts with them."""
        h, _ = self.hidden_states(input_ids)
        return self.output(h, targets)

    @torch.no_grad()
    def forward_with_cache(
        self,
        input_ids: torch.Tensor,
        past: list[KVCache] | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Generation step: logits of the last position (B, V) and the extended caches.

        With left-padded rows pass `key_padding_mask` (B, S_past + S) over every key so far (see
        `hidden_states`); the last position must then be a real token of every row.
        """
        h, caches = self.hidden_states(input_ids, past, key_padding_mask=key_padding_mask, positions=positions)
        return self.output(h[:, -1:])[:, 0], caches


    def allocate_cache(self, batch: int, max_len: int) -> DecodeCache:
        """Preallocated caches for `batch` rows of up to `max_len` tokens, in the parameters' dtype and device."""
        w = self.tok_embeddings.weight
        a = self.args
        shape = (batch, a.n_heads, max_len, a.head_dim)
        layers = [StaticKV(torch.zeros(shape, dtype=w.dtype, device=w.device), torch.zeros(shape, dtype=w.dtype, device=w.device))
                  for _ in self.layers]
        rope, tables = [], []  # one table per distinct inv_freq (open_lm gives every layer its own, equal ones)
        for layer in self.layers:
            pe = layer.attention.pos_embed
            if pe is None:
                rope.append(None)
                continue
            same = [t for f, by_head, t in tables if by_head == pe.by_head and torch.equal(f, pe.inv_freq)]
            if not same:
                tables.append((pe.inv_freq, pe.by_head, pe.table(max_len, a.n_heads, w.device)))
                same = [tables[-1][2]]
            rope.append(same[0])
        return DecodeCache(layers, rope, max_len)

    @torch.no_grad()
    def forward_static(
        self,
        input_ids: torch.Tensor,
        cache: DecodeCache,
        index: torch.Tensor,
        *,
        positions: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        kv_len: int | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Generation step on a preallocated cache: logits (B, rows) of the last position, fp32.

        input_ids (B, S) go to cache columns `index` (S,) int64, with rotary positions (B, S) (a left-padded
        row's real tokens at 0, 1, ..., see `hidden_states`). kv_len and key_padding_mask as in
        `CustomAttn.forward_static`: kv_len = n attends columns [0, n) (mask (B, n) or None); None attends the
        whole cache under a (B, S_max) mask of the written columns (static shapes for CUDA graphs). rows = (a, b)
        computes only output rows [a, b) (the image ids while decoding an image), None all of them.
        """
        x = self.post_embed_norm.forward(F.embedding(input_ids, self.tok_embeddings.weight))  # (B, S, dim); no hooks
        bias = None  # one token on the CPU: the decode path's mask, made once for every layer
        if key_padding_mask is not None and input_ids.shape[1] == 1 and use_decode_attention(x, self.args.attn_backend):
            bias = decode_attention_bias(key_padding_mask, self.args.n_heads, x.dtype, kv_len is not None)
        ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layers sharing a table share its gather
        for layer, kv, table in zip(self.layers, cache.layers, cache.rope):
            rope = None if table is None else ropes.get(id(table)) or ropes.setdefault(id(table), table.at(positions))
            x = layer.forward_static(x, kv, index, rope, key_padding_mask, kv_len, bias)  # (B, S, dim)
        h = self.norm.forward(x[:, -1:])  # (B, 1, dim): the norm is per position, only the last one is sampled from
        return self.output.logits(h, rows)[:, 0]  # (B, rows)


def padded_positions(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True = real token -> (B, S) int64 positions counting real tokens only (pads get 0).

    Left padding with n pads: positions -n, ..., -1 clamped to 0, then 0, 1, 2, ... (offset -n per row).
    """
    return (key_padding_mask.long().cumsum(-1) - 1).clamp_(min=0)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(args: ModelArgs, modality_bounds: tuple[int, ...] = (), device: str | torch.device = "cpu",
                init: bool = True) -> Transformer:
    """Instantiate on `device` ("meta" allocates nothing, for counting and sharded init); `init=False` leaves the
    parameters to the caller (`init_steps`)."""
    with torch.device(device):
        return Transformer(args, modality_bounds, init)
