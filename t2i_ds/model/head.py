"""The LM head: owns the output weight [V, dim] and computes the loss in its own forward.

Keeping the projection and the loss in one module matters for DeepSpeed ZeRO-3, which gathers a
module's partitioned parameters only around that module's forward: the fused kernel reads
`self.weight` inside `forward`, so it sees the full weight without any external-parameter hook.

With targets, the head returns per-modality loss *sums* and target *counts* (text, image, special;
split by target id range, paper Fig. 4), never a mean: the trainer divides once by the global
target count of the whole batch, kept on device. The loss is the sum mode of t2i_kernels
(`linear_cross_entropy_sum`): the trainer backpropagates `loss_sum * scale`, a scalar, so the
gradient is formed in the forward pass (6·N·H·V matmul FLOPs, no logits recompute).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2i_kernels.cross_entropy import linear_cross_entropy_sum, modality_sums

from t2i_ds.vocab import IGNORE


class LossOutput(NamedTuple):
    """Loss of one micro-batch as sums, so micro-batches and ranks add up exactly.

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 re-gathers a module's parameters before its
    backward through hooks on the tensors of the module's output, and it only looks inside tuples,
    lists and dicts. With a dataclass the head's backward would see its partitioned (empty) weight.

    loss_sum: scalar fp32, sum of per-token losses over non-ignored targets (carries the graph).
    modality_sums: (M,) fp32, per-modality loss sums (detached), M = 3: text, image, special.
    modality_counts: (M,) fp32, per-modality target counts.
    """

    loss_sum: torch.Tensor
    modality_sums: torch.Tensor
    modality_counts: torch.Tensor

    @property
    def count(self) -> torch.Tensor:
        return self.modality_counts.sum()


class LMHead(nn.Module):
    """Output projection + loss. Parameter name `weight` so the key is open_lm's `output.weight`."""

    def __init__(self, dim: int, vocab_size: int, modality_bounds: tuple[int, ...] = (), loss_impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.modality_bounds = tuple(modality_bounds)
        self.loss_impl = loss_impl

    def logits(self, h: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, S, dim) -> fp32 logits of output rows [rows[0], rows[1]) only (all rows: None), (B, S, n).

        Generation samples image ids only: their 16,384 rows are a quarter of the 66,822 (a 4x smaller matmul).
        """
        w = self.weight if rows is None else self.weight[rows[0] : rows[1]]  # (n, dim) view
        return F.linear(h, w).float()

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor | LossOutput:
        # h: (B, S, dim); targets: (B, S) or None
        if targets is None:
            return F.linear(h, self.weight).float()  # (B, S, V) logits, fp32 as open_lm returns them
        flat = targets.flatten()  # (B*S,)
        loss_sum, loss = linear_cross_entropy_sum(h.flatten(0, 1), self.weight, flat, ignore_index=IGNORE,
                                                  impl=self.loss_impl)  # (), (B*S,) detached
        sums, counts = modality_sums(loss, flat, self.modality_bounds, ignore_index=IGNORE)  # (M,), (M,)
        return LossOutput(loss_sum, sums, counts.float())
