"""The loss API the model calls: the linear + cross-entropy dispatcher over its three paths, and modality sums.

Paths (same semantics: per-token fp32 loss, 0 at ``ignore_index``, exact gradients for any upstream gradient):
``torch`` (eager, materialises [N, V]; the reference), ``chunked`` (pure torch, memory-bounded; chunked_ce.py) and
``triton`` (the fused kernel; fused_linear_ce.py). This module imports no triton: CPU-only installs use it as is.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from t2i_kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_torch

IMPLS = ("auto", "torch", "chunked", "triton")


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
    """True when triton and our fused kernel module import (cached after the first call)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        _TRITON_OK = False
        if importlib.util.find_spec("triton") is not None:
            try:
                importlib.import_module("t2i_kernels.fused_linear_ce")
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
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if h.is_cuda and triton_available() else "chunked"
    if impl == "torch":
        return linear_cross_entropy_torch(h, w, targets, ignore_index)
    if impl == "chunked":
        return chunked_linear_cross_entropy(h, w, targets, ignore_index)
    if not triton_available():
        raise RuntimeError("impl='triton' needs the `triton` package (pip install 't2i_ds[triton]'); "
                           "use impl='chunked' on machines without it")
    from t2i_kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h, w, targets, ignore_index)
