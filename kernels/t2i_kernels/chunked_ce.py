"""Memory-bounded linear + cross-entropy in pure torch, and the plain eager path (the reference).

Same semantics as ``fused_linear_ce.fused_linear_cross_entropy`` (see its docstring for the math): per-token fp32
loss, 0 at ``ignore_index``, exact gradients for any upstream gradient. This path runs wherever Triton does not
(CPU training, CI) and is the fallback of ``cross_entropy.linear_cross_entropy(impl="auto")``.

Chunked path: tokens are processed ``chunk_tokens`` at a time. Forward computes each chunk's logits with one GEMM in
the input dtype (the numerics of ``F.linear``), upcasts them to fp32 for the log-sum-exp and the target logit, and
keeps only ``lse`` [N]. Backward recomputes the chunk's logits, forms ``dz = g * (softmax - onehot)`` in fp32 and
computes ``dh[chunk] = dz @ w`` (complete per chunk: the reduction over V is one GEMM) and ``dw += dz^T @ h[chunk]``
in an fp32 [V, H] accumulator (an fp32 GEMM, so no per-chunk rounding to bf16).

Memory bound beyond inputs/outputs: forward ``chunk * V * (4 + sizeof(dtype))`` bytes; backward the same plus
``V * H * 4`` (fp32 dw) and ``chunk * H * 4`` (fp32 copy of the chunk's h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, ignore_index, chunk_tokens):
        N = h.shape[0]
        valid = targets != ignore_index                                           # [N]
        safe_tgt = torch.where(valid, targets, 0).long()                          # [N], gather-safe
        lse = torch.empty(N, device=h.device, dtype=torch.float32)               # [N]
        z_tgt = torch.empty(N, device=h.device, dtype=torch.float32)             # [N]
        for s in range(0, N, chunk_tokens):
            e = min(s + chunk_tokens, N)
            z = F.linear(h[s:e], w).float()                                       # [C, V] fp32
            lse[s:e] = torch.logsumexp(z, dim=-1)
            z_tgt[s:e] = z.gather(1, safe_tgt[s:e, None]).squeeze(1)              # same fp32 logits
            del z
        loss = torch.where(valid, (lse - z_tgt).clamp_min(0.0), 0.0)              # [N]
        ctx.save_for_backward(h, w, safe_tgt, valid, lse)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        h, w, safe_tgt, valid, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, C = h.shape[0], ctx.chunk_tokens
        g = torch.where(valid, dloss.float(), 0.0)                                # [N]; select keeps NaN out
        dh = torch.empty_like(h) if need_dh else None                             # [N, H]
        dw32 = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_dw else None  # [V, H]
        for s in range(0, N, C):
            e = min(s + C, N)
            dz = F.linear(h[s:e], w).float()                                      # [C, V] recomputed logits
            dz.sub_(lse[s:e, None]).exp_()                                        # softmax
            idx = safe_tgt[s:e, None]                                             # [C, 1], one index per row
            dz.scatter_(1, idx, dz.gather(1, idx) - valid[s:e, None].float())     # - onehot (valid rows)
            dz.mul_(g[s:e, None])                                                 # * upstream grad
            if need_dh:
                dh[s:e] = (dz.to(h.dtype) @ w)                                    # [C, H], one GEMM over V
            if need_dw:
                dw32.addmm_(dz.t(), h[s:e].float())                               # [V, H] fp32 accumulation
            del dz
        dw = None
        if need_dw:
            dw = dw32 if w.dtype == torch.float32 else dw32.to(w.dtype)
        return dh, dw, None, None, None


def chunked_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Per-token fp32 cross-entropy of ``h [N, H] @ w [V, H].T`` with fp32 logits held for ``chunk_tokens`` rows.

    Returns [N] fp32, 0 at ignored rows; gradients for h and w as in the fused kernel.
    """
    if h.dim() != 2 or w.dim() != 2 or targets.dim() != 1 or h.shape[1] != w.shape[1] \
            or h.shape[0] != targets.shape[0]:
        raise ValueError(f"expected h [N, H], w [V, H], targets [N]; got {tuple(h.shape)}, {tuple(w.shape)}, "
                         f"{tuple(targets.shape)}")
    if h.dtype != w.dtype:
        raise TypeError(f"h and w must share a dtype, got {h.dtype} and {w.dtype}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return _ChunkedLinearCrossEntropy.apply(h, w, targets, ignore_index, chunk_tokens)


def linear_cross_entropy_torch(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The plain eager path: ``F.linear`` in the input dtype, then ``F.cross_entropy`` on fp32 logits. [N] fp32."""
    logits = F.linear(h, w)                                                       # [N, V] input dtype
    return F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index, reduction="none")
