"""Sum-mode linear + cross-entropy for training: the gradient is formed in the forward pass, 6·N·H·V matmul FLOPs.

The trainer backpropagates ``loss_sum x scalar`` (the per-modality split is detached), so the gradient of the
objective w.r.t. the logits is known in the forward pass up to that scalar. This path therefore never recomputes
the logits (the per-token kernels must, since their upstream gradient is only known in backward: 8·N·H·V).

Math (h [N, H], w [V, H], targets t [N]; dz as in ``t2i_kernels.ce_grad_pass``):

    for each chunk c of C tokens (fixed order):
        z     = h[c] @ w^T                       [C, V] in the input dtype       torch.mm (cuBLAS on a GPU)   2CHV
        loss[c], dz = grad pass over z            lse, loss, dz = softmax - onehot written over z   (Triton / torch)
        dh32[c]  = dz @ w                        [C, H] fp32 output              torch.mm(out_dtype=fp32)     2CHV
        dw32    += dz^T @ h[c]                   [V, H] fp32 accumulator         torch.addmm(out_dtype=fp32)  2CHV
    loss_sum = sum(loss)                          (and the per-token loss [N], detached, for the modality sums)
    backward, upstream scalar g:  dh = g * dh32,  dw = g * dw32    (one rounding each, to the parameter dtype)

FLOPs: 6·N·H·V in matmuls, nothing recomputed. Deterministic: fixed chunk order, fixed-order fp32 accumulation
into dw32 (cuBLAS GEMMs are run-to-run reproducible for fixed shapes), no atomics in the pass.

Memory beyond inputs and outputs (bf16, N = 9,216, H = 2,048, V = 66,822, chunks of C = 2,304 tokens):
    logits chunk  C·V·2  = 294 MiB   (one buffer, reused by every chunk)
    dw32          V·H·4  = 522 MiB   (fp32 accumulator, held from forward to backward)
    dh32          N·H·4  =  72 MiB   (held from forward to backward)
peak ~890 MiB in forward; in backward dw32 + dh32 + the bf16 dw, dh = ~890 MiB. Measured on meta tensors in
tests/test_ce_sum.py and benchmarks/README_fused_ce.md. The chunk is sized so the logits buffer stays <= 320 MiB.

Per-token mode (``cross_entropy.linear_cross_entropy``) stays for non-uniform upstream gradients (scoring, probes).
This module imports no triton: the "torch" grad pass runs anywhere (CPU training, CI); "triton" loads the kernel.

torch.compile: the whole forward is one ``torch.library`` custom op (``torch.ops.t2i.lce_sum``) whose autograd
formula is the scaling above, so a compiled graph keeps it as one opaque node with the scaling as its backward.
"""

from __future__ import annotations

import functools
import math

import torch

GRAD_PASSES = ("torch", "triton")
_CHUNK_LOGITS_BYTES = 320 * 2**20          # logits chunk cap: 4 chunks of 2,304 tokens at the paper's shape
_CHUNK_MULTIPLE = 128                      # chunk rows in multiples of a GEMM tile


def default_chunk_tokens(N: int, V: int, itemsize: int) -> int:
    """Tokens per chunk: as few balanced chunks as keep C·V·itemsize <= 320 MiB, rounded up to 128 rows."""
    n_chunks = max(1, math.ceil(N * V * itemsize / _CHUNK_LOGITS_BYTES))
    return max(_CHUNK_MULTIPLE, math.ceil(math.ceil(N / n_chunks) / _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE)


# ----------------------------------------------------------------------------------------------------------------
# fp32-output matmuls of 16-bit operands: cuBLAS with out_dtype on a GPU (and on meta tensors, for measurements)
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _has_out_dtype() -> bool:
    """torch's mm/addmm take ``out_dtype`` (bf16/fp16 operands, fp32 output; CUDA kernels since torch 2.8)."""
    return all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def _native_f32_out(a: torch.Tensor) -> bool:
    return a.dtype in (torch.bfloat16, torch.float16) and a.device.type != "cpu" and _has_out_dtype()


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, N] fp32 = a [M, K] @ b [K, N] with fp32 accumulation and one fp32 result (no 16-bit rounding)."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _native_f32_out(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # CPU (no out_dtype kernel): exact fp32 products of the 16-bit values, fp32 sums
        torch.mm(a.float(), b.float(), out=out)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [M, N] fp32 += a [M, K] @ b [K, N], accumulated in fp32 in place."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, out=acc)
    elif _native_f32_out(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.addmm(acc, a.float(), b.float(), out=acc)


# ----------------------------------------------------------------------------------------------------------------
# The grad pass in pure torch (CPU path; the Triton kernel is t2i_kernels.ce_grad_pass)
# ----------------------------------------------------------------------------------------------------------------


def ce_grad_pass_torch(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """The Triton pass's math in torch: loss [C] fp32; with ``write_grad`` z [C, V] becomes softmax - onehot.

    log_softmax is written over the fp32 logits in place (its row kernels read a row before writing it): one fused
    pass and no [C, V] temporary. `torch.logsumexp` then `sub_` / `exp_` took 0.50 s against 0.26 s at C = 1,152,
    V = 66,822 on one core, where the training step is ~5 s (benchmarks/README.md, "One run of every part")."""
    valid = targets != ignore_index                                               # [C]
    safe = torch.where(valid, targets, 0).long()[:, None]                         # [C, 1]
    zf = z.float()                                                                # [C, V] fp32: z itself if fp32
    if zf is z and not write_grad:
        zf = z.clone()                                                            # z stays the logits
    logp = torch.log_softmax(zf, dim=-1, out=zf)                                  # [C, V] fp32, in place
    loss = torch.where(valid, (-logp.gather(1, safe).squeeze(1)).clamp_min(0.0), 0.0)
    if write_grad:
        p = logp.exp_()                                                           # softmax, fp32
        p.scatter_add_(1, safe, -valid[:, None].float())                          # - onehot on valid rows
        p.masked_fill_(~valid[:, None], 0.0)                                      # ignored rows: exact zeros
        if p is not z:
            z.copy_(p)                                                            # one rounding to z's dtype
    return loss


def _grad_pass(name: str):
    if name == "torch":
        return ce_grad_pass_torch
    import t2i_kernels.ce_grad_pass  # noqa: F401  (registers torch.ops.t2i.ce_grad_pass)

    return torch.ops.t2i.ce_grad_pass


# ----------------------------------------------------------------------------------------------------------------
# Forward (the whole computation) and backward (a scaling)
# ----------------------------------------------------------------------------------------------------------------


def lce_sum_forward(h, w, targets, ignore_index: int, chunk_tokens: int, need_dh: bool, need_dw: bool,
                    grad_pass: str):
    """(loss [N] fp32, dh32 [N, H] fp32 or [0], dw32 [V, H] fp32 or [0]): the body of ``torch.ops.t2i.lce_sum``.

    dh32 and dw32 are the gradients of sum(loss) (upstream gradient 1). Runs on meta tensors too (FLOP and memory
    measurements at the real shape, the compile gate).
    """
    N, H = h.shape
    V = w.shape[0]
    f32 = dict(device=h.device, dtype=torch.float32)
    write_grad = need_dh or need_dw
    pass_fn = _grad_pass(grad_pass)
    loss = torch.empty(N, **f32)                                                  # [N]
    dh32 = torch.empty(N, H, **f32) if need_dh else h.new_empty(0, dtype=torch.float32)
    dw32 = torch.empty(V, H, **f32) if need_dw else w.new_empty(0, dtype=torch.float32)  # the first chunk writes it
    C = min(chunk_tokens, N)
    z_buf = torch.empty(C, V, device=h.device, dtype=h.dtype)                     # [C, V], reused by every chunk
    wt = w.t()                                                                    # [H, V] view
    for s in range(0, N, C):
        e = min(s + C, N)
        h_c = h[s:e]                                                              # [c, H] view
        z = z_buf[: e - s]                                                        # [c, V] view
        torch.mm(h_c, wt, out=z)                                                  # logits, input dtype
        loss[s:e] = pass_fn(z, targets[s:e], ignore_index, write_grad)            # z -> dz when write_grad
        if need_dh:
            _mm_f32(z, w, out=dh32[s:e])                                          # [c, H] = dz @ w
        if need_dw and s == 0:
            _mm_f32(z.t(), h_c, out=dw32)                                         # [V, H] = dz^T @ h_c
        elif need_dw:
            _addmm_f32_(dw32, z.t(), h_c)                                         # [V, H] += dz^T @ h_c
        del h_c, z
    return loss, dh32, dw32


def lce_sum_backward(g: torch.Tensor, dh32: torch.Tensor, dw32: torch.Tensor, h_dtype, w_dtype):
    """(dh, dw) = g * (dh32, dw32), each written straight in its parameter dtype (no fp32 temporary). Not in place:
    the formula must stay functional for torch.compile (AOT autograd) and a retain_graph backward."""
    dh = torch.mul(dh32, g, out=torch.empty(dh32.shape, device=dh32.device, dtype=h_dtype)) if dh32.numel() else None
    dw = torch.mul(dw32, g, out=torch.empty(dw32.shape, device=dw32.device, dtype=w_dtype)) if dw32.numel() else None
    return dh, dw


@torch.library.custom_op("t2i::lce_sum", mutates_args=())
def _lce_sum_op(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    need_dh: bool, need_dw: bool, grad_pass: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum [] fp32, loss [N] fp32, dh32, dw32); only loss_sum is differentiable (see the module docstring)."""
    loss, dh32, dw32 = lce_sum_forward(h, w, targets, ignore_index, chunk_tokens, need_dh, need_dw, grad_pass)
    return loss.sum(), loss, dh32, dw32


@_lce_sum_op.register_fake
def _(h, w, targets, ignore_index, chunk_tokens, need_dh, need_dw, grad_pass):
    N, H = h.shape
    f32 = torch.float32
    return (h.new_empty((), dtype=f32), h.new_empty(N, dtype=f32),
            h.new_empty((N, H) if need_dh else (0,), dtype=f32),
            w.new_empty(tuple(w.shape) if need_dw else (0,), dtype=f32))


def _setup_context(ctx, inputs, output):
    h, w, *_ = inputs
    _, loss, dh32, dw32 = output
    ctx.save_for_backward(dh32, dw32)
    ctx.mark_non_differentiable(loss, dh32, dw32)
    ctx.h_dtype, ctx.w_dtype = h.dtype, w.dtype


def _backward(ctx, g, _dloss, _ddh32, _ddw32):
    dh32, dw32 = ctx.saved_tensors
    dh, dw = lce_sum_backward(g, dh32, dw32, ctx.h_dtype, ctx.w_dtype)
    return dh, dw, None, None, None, None, None, None


_lce_sum_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_sum(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    grad_pass: str = "torch",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-token cross-entropy of ``h @ w.T``, with its gradient formed in the forward pass.

    Args:
        h: [N, H] hidden states, bf16/fp16/fp32 (any strides).
        w: [V, H] output projection, same dtype.
        targets: [N] int32/int64 ids in [0, V) or ``ignore_index`` (no loss, no gradient).
        grad_pass: "torch" (any device) or "triton" (the fused pass of t2i_kernels.ce_grad_pass).
        chunk_tokens: tokens per chunk (default ``default_chunk_tokens``: logits chunk <= 320 MiB).
    Returns:
        (loss_sum: [] fp32, differentiable for any upstream scalar; loss: [N] fp32 per-token, detached,
        0 at ignored rows). Gradients are computed only for inputs that need them, and none under no_grad.
    """
    if h.dim() != 2 or w.dim() != 2 or targets.dim() != 1 or h.shape[1] != w.shape[1] \
            or h.shape[0] != targets.shape[0]:
        raise ValueError(f"expected h [N, H], w [V, H], targets [N]; got {tuple(h.shape)}, {tuple(w.shape)}, "
                         f"{tuple(targets.shape)}")
    if h.dtype != w.dtype or h.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"h and w must share a dtype among bf16/fp16/fp32; got {h.dtype}, {w.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32/int64, got {targets.dtype}")
    if grad_pass not in GRAD_PASSES:
        raise ValueError(f"grad_pass must be one of {GRAD_PASSES}, got {grad_pass!r}")
    N, V = h.shape[0], w.shape[0]
    if N == 0:  # no tokens: an exact zero that keeps the graph connected
        zero = (h.sum() * 0.0).float() + (w.sum() * 0.0).float()
        return zero, h.new_zeros(0, dtype=torch.float32)
    targets = targets.contiguous()
    # Device-side range check (no host sync): an out-of-range id would otherwise read past the logits row.
    torch._assert_async(((targets >= 0) & (targets < V) | (targets == ignore_index)).all())
    C = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(N, V, h.element_size())
    if C <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {C}")
    grad = torch.is_grad_enabled()
    loss_sum, loss, _, _ = _lce_sum_op(h, w, targets, ignore_index, C, grad and h.requires_grad,
                                       grad and w.requires_grad, grad_pass)
    return loss_sum, loss
