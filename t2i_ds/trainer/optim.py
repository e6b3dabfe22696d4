"""The optimizer DeepSpeed steps: torch's fused AdamW, and for ZeRO stage 0 in fp32 one that skips non-finite steps.

ZeRO-1/2/3 and DeepSpeed's bf16/fp16 optimizers compute the global gradient norm, skip the update when it is not
finite and set `overflow`; the engine then counts the step in `skipped_steps` and holds the LR schedule. Stage 0 in
fp32 steps the client optimizer as it is and clips in place, so a NaN gradient would reach every weight.
`CheckedAdamW` does what those optimizers do: the norm of the gradients it sees (after DeepSpeed's all-reduce:
the global norm, the same on every rank), clip, and skip with `overflow = True` when the norm is not finite.

Why stage 0 at all: on one rank ZeRO partitions nothing and costs a copy of every gradient into its buckets, a
flatten, an fp64 norm and a copy of the fp32 partition back into the weights per step; at dim 512 with the
paper's vocabulary on one CPU core that was ~1 s of a ~4.5 s step: 271 tokens/s under zero2.json, 360 under
zero0.json (benchmarks/results/peers.jsonl).
"""

from __future__ import annotations

import torch

from t2i_ds.config import Config


def adamw_kwargs(cfg: Config) -> dict:
    o = cfg.optim
    # fused: one pass over each tensor, CUDA and CPU kernels alike; torch's CPU default is the per-op loop
    # (75M parameters on one core: 0.52 s a step against 0.09 s)
    return dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that clips to `max_norm` (0: no clipping) and skips a step whose gradient norm is not finite.

    After `step()`: `overflow` (True when skipped: no weight, moment or step count changed) and `_global_grad_norm`
    (the norm before clipping; DeepSpeed's engine reads both attributes by these names)."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # as torch's optimizers: the closure recomputes the gradients first
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)  # fp32 scalar
        self.overflow = not bool(torch.isfinite(norm))  # one host sync, as ZeRO's own check has
        self._global_grad_norm = float("inf") if self.overflow else norm
        if self.overflow:
            return loss
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        super().step()
        return loss


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config, checked: bool) -> torch.optim.Optimizer:
    """AdamW over `params`; `checked`: the CheckedAdamW of ZeRO stage 0 in fp32 (it clips to optim.grad_clip)."""
    if checked:
        return CheckedAdamW(params, max_norm=cfg.optim.grad_clip, **adamw_kwargs(cfg))
    return torch.optim.AdamW(params, **adamw_kwargs(cfg))
