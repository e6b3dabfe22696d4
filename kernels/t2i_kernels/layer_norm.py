"""Fused LayerNorm with weight and bias (open_lm-1b's `default_layer_norm`), forward and backward, in Triton.

Trio: `_ln_fwd_kernel` / `_ln_bwd_kernel`, the pure-torch `layer_norm_ref`, the autograd op `LayerNormFunc` /
`layer_norm`. Not wired into the model: its default path stays `torch.nn.LayerNorm` until a GPU measurement says
this wins (see benchmarks/README_attention.md).

Math, per row x of length N (all statistics in fp32, whatever the input dtype):

    mu = mean(x),  rstd = 1 / sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) * rstd
    y  = xhat * w + b
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  with g = w * dy
    dw = sum_rows dy * xhat,  db = sum_rows dy

The backward is deterministic without atomics: each of G programs owns a contiguous range of rows and writes its
partial dw, db to row `pid` of a (G, N) fp32 buffer; torch sums the G partials in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from t2i_kernels._common import compiled_for_gpu, multiprocessor_count


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim in fp32 (fp64 stays fp64), returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mu = xf.mean(-1, keepdim=True)
    var = (xf - mu).pow(2).mean(-1, keepdim=True)  # biased variance, as torch.nn.LayerNorm
    return ((xf - mu) * torch.rsqrt(var + eps) * weight.to(acc) + bias.to(acc)).to(x.dtype)


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    # One program per row; the whole row (N <= BLOCK_N) sits in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # 1. fp32 statistics (two-pass over registers: no E[x^2] - E[x]^2 cancellation).
    mean = tl.sum(x, 0) / N
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    # 2. Affine and store; mean and rstd are kept for the backward.
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,
    stride_x, stride_dy, stride_dx, M, N, ROWS_PER_PROGRAM,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROGRAM
    n_rows = tl.minimum(row_start + ROWS_PER_PROGRAM, M) - row_start
    row_start = row_start.to(tl.int64)  # 64-bit row offsets
    for i in range(0, n_rows):
        r = row_start + i
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r)
        rstd = tl.load(RSTD + r)
        # 1. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy; padded columns hold 0 in xhat and g.
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = w * dy
        c_xhat = tl.sum(g * xhat, 0) / N
        c_mean = tl.sum(g, 0) / N
        dx = (g - c_mean - xhat * c_xhat) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        # 2. This program's share of dw and db.
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    tl.store(DB_PART + pid * N + cols, db, mask=mask)


def _num_partials(m: int, device: torch.device) -> int:
    if compiled_for_gpu(device):
        return min(m, 4 * multiprocessor_count(device))
    return min(m, 4)  # interpreter: few programs, each looping over its rows


class LayerNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        shape = x.shape
        N = shape[-1]
        x2 = x.reshape(-1, N)  # (M, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_n = triton.next_power_of_2(N)
        _ln_fwd_kernel[(M,)](x2, weight, bias, y, mean, rstd, x2.stride(0), y.stride(0), N, eps,
                             BLOCK_N=block_n, num_warps=min(max(block_n // 256, 1), 16))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        grid = _num_partials(M, x2.device)
        dw_part = torch.empty((grid, N), dtype=torch.float32, device=x2.device)
        db_part = torch.empty((grid, N), dtype=torch.float32, device=x2.device)
        block_n = triton.next_power_of_2(N)
        _ln_bwd_kernel[(grid,)](x2, weight, dy2, dx, mean, rstd, dw_part, db_part,
                                x2.stride(0), dy2.stride(0), dx.stride(0), M, N, triton.cdiv(M, grid),
                                BLOCK_N=block_n, num_warps=min(max(block_n // 256, 1), 16))
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype)
        return dx.view(dy.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., N] with weight [N] and bias [N]; fp32 statistics, x's dtype out."""
    N = x.shape[-1]
    if weight.shape != (N,) or bias.shape != (N,):
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be ({N},)")
    if not (x.device == weight.device == bias.device):
        raise ValueError("layer_norm: x, weight and bias must be on one device")
    if N > 65536:
        raise ValueError(f"layer_norm: rows of {N} elements exceed the single-block kernel (<= 65536)")
    return LayerNormFunc.apply(x, weight, bias, eps)
