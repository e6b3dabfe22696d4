"""The loss API the model calls: the linear + cross-entropy dispatchers over their three paths, and modality sums.

Per-token mode, ``linear_cross_entropy`` (per-token fp32 loss, 0 at ``ignore_index``, exact gradients for any
upstream gradient): ``torch`` (eager, materialises [N, V]; the reference), ``chunked`` (pure torch,
memory-bounded; chunked_ce.py) and ``triton`` (the fused kernel; fused_linear_ce.py). 8·N·H·V FLOPs for the
memory-bounded paths (the logits are recomputed in backward).

Sum mode, ``linear_cross_entropy_sum`` (the trainer's: the scalar sum of the per-token losses, differentiable for
any upstream *scalar*, plus the detached per-token losses for the modality split): ``torch`` (the eager path,
summed), ``chunked`` (ce_sum.py with its torch grad pass) and ``triton`` (ce_sum.py with the Triton grad pass).
6·N·H·V FLOPs: the gradient is formed in the forward pass (see ce_sum.py).

This module imports no triton: CPU-only installs use it as is.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from t2i_kernels.ce_sum import linear_cross_entropy_sum as _ce_sum
from t2i_kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_torch

from t2i_kernels.names import LOSS_IMPLS as IMPLS  # torch-free, for the configs


def modality_sums(
    loss: torch.Tensor,
    targets: torch.Tensor,
    boundaries: tuple[int, ...],
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token loss and count of target tokens per modality bucket, on device (no sync).

    ``boundaries = (b_1, ..., b_{M-1})``, increasing, defines M buckets [0, b_1), [b_1, b_2), ..., [b_{M-1}, inf);
    e.g. ``(T, T + I)`` gives text / image / special. Ignored targets are in no bucket.

    Returns ``(sums [M] fp32, counts [M] int64)``; ``sums`` is differentiable w.r.t. ``loss``. Reductions are
    plain ``sum`` (no scatter atomics), hence deterministic.
    """
    bounds = tuple(int(b) for b in boundaries)
    if any(b1 >= b2 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries}")
    M = len(bounds) + 1
    # Bucket id by comparisons with Python scalars: no boundary tensor, hence no host-to-device copy.
    bucket = torch.zeros_like(targets)                                            # [N]
    for b in bounds:
        bucket += (targets >= b).to(targets.dtype)
    ids = torch.arange(M, device=targets.device, dtype=targets.dtype)            # [M]
    member = (bucket[:, None] == ids[None, :]) & (targets != ignore_index)[:, None]   # [N, M] bool
    sums = torch.where(member, loss.float()[:, None], 0.0).sum(dim=0)             # [M] fp32
    counts = member.sum(dim=0)                                                    # [M] int64
    return sums, counts


@torch.compiler.assume_constant_result  # a process-wide constant: torch.compile runs it once, never traces it
def triton_available() -> bool:
    """True when triton and our fused kernel modules import (cached after the first call)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        _TRITON_OK = False
        if importlib.util.find_spec("triton") is not None:
            try:
                importlib.import_module("t2i_kernels.fused_linear_ce")
                importlib.import_module("t2i_kernels.ce_grad_pass")
                _TRITON_OK = True
            except Exception:  # noqa: BLE001 - a broken triton install must not break the CPU path
                _TRITON_OK = False
    return _TRITON_OK


_TRITON_OK: bool | None = None


def linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token fp32 cross-entropy of ``h @ w.T``; 0 at ignored rows.

    impl: "torch" (plain eager, materialises [N, V]), "chunked" (pure torch, memory-bounded), "triton" (fused
    kernel), "auto" (triton on CUDA tensors when it imports, else chunked).
    """
    impl = _resolve(impl, h)
    if impl == "torch":
        return linear_cross_entropy_torch(h, w, targets, ignore_index)
    if impl == "chunked":
        return chunked_linear_cross_entropy(h, w, targets, ignore_index)
    from t2i_kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h, w, targets, ignore_index)


def linear_cross_entropy_sum(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum mode: ``(loss_sum [] fp32, loss [N] fp32 detached)`` of ``h @ w.T``; loss 0 at ignored rows.

    ``loss_sum`` is differentiable for any upstream scalar (the trainer's ``loss_sum * scale``); ``loss`` is for
    detached statistics (modality sums). impl as in ``linear_cross_entropy``: "torch" (eager, summed),
    "chunked" (ce_sum.py, torch grad pass), "triton" (ce_sum.py, Triton grad pass), "auto".
    """
    impl = _resolve(impl, h)
    if impl == "torch":
        loss = linear_cross_entropy_torch(h, w, targets, ignore_index)
        return loss.sum(), loss.detach()
    return _ce_sum(h, w, targets, ignore_index, grad_pass="triton" if impl == "triton" else "torch")


def _resolve(impl: str, h: torch.Tensor) -> str:
    """impl -> "torch" / "chunked" / "triton"; "auto" is triton on CUDA tensors when it imports, else chunked."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if h.is_cuda and triton_available() else "chunked"
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' needs the `triton` package (pip install 't2i_ds[triton]'); "
                           "use impl='chunked' on machines without it")
    return impl
