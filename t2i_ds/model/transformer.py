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

import torch
import torch.nn as nn
import torch.utils.checkpoint

from t2i_ds.model.args import ModelArgs
from t2i_ds.model.head import LMHead, LossOutput
from t2i_ds.model.layers import Block, KVCache, make_norm, trunc_normal_


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, modality_bounds: tuple[int, ...] = ()):
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
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """open_lm init: truncated normal, std 1/sqrt(dim); output projections depth-scaled."""
        if self.tok_embeddings.weight.is_meta:
            return
        std = 1.0 / math.sqrt(self.args.dim)
        trunc_normal_(self.tok_embeddings.weight, std)
        if not self.args.weight_tying:
            trunc_normal_(self.output.weight, std)
        for layer in self.layers:
            layer.attention.reset_parameters()
            layer.feed_forward.reset_parameters()
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()  # gain 1, bias 0

    def hidden_states(
        self, input_ids: torch.Tensor, past: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Final-norm hidden states (B, S, dim) and the per-layer KV caches."""
        x = self.post_embed_norm(self.tok_embeddings(input_ids))  # (B, S, dim)
        caches: list[KVCache] = []
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if self.grad_checkpointing and self.training and layer_past is None:
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x, kv = layer(x, layer_past)
            caches.append(kv)
        return self.norm(x), caches

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor | LossOutput:
        """Logits (B, S, V) in fp32 without targets; per-modality loss sums and counts with them."""
        h, _ = self.hidden_states(input_ids)
        return self.output(h, targets)

    @torch.no_grad()
    def forward_with_cache(
        self, input_ids: torch.Tensor, past: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Generation step: logits of the last position (B, V) and the extended caches."""
        h, caches = self.hidden_states(input_ids, past)
        return self.output(h[:, -1:])[:, 0], caches


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(args: ModelArgs, modality_bounds: tuple[int, ...] = (), device: str | torch.device = "cpu") -> Transformer:
    """Instantiate on `device` ("meta" allocates nothing, for counting and sharded init)."""
    with torch.device(device):
        return Transformer(args, modality_bounds)
