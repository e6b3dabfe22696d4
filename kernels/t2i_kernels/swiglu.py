"""Fused SwiGLU activation on the fused w12 output, forward and backward, in Triton.

Trio: `_swiglu_fwd_kernel` / `_swiglu_bwd_kernel`, the pure-torch `swiglu_ref`, the autograd op `SwiGLUFunc` /
`swiglu`. open_lm (xformers `SwiGLU`, `swiglu_torch`): `gate, up = w12(x).chunk(2, -1)`, so the FIRST half of
the last dim is the gate. Not wired into the model: its default path stays pure torch.

Math, elementwise with sigma the logistic function (fp32 inside, one rounding at the store):

    y      = silu(g) * u = g * sigma(g) * u
    d_u    = dy * g * sigma(g)
    d_g    = dy * u * sigma(g) * (1 + g * (1 - sigma(g)))

Only the input x12 is saved (half the bytes of saving silu(g) and u separately); the backward recomputes sigma.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def swiglu_ref(x12: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32 (fp64 stays fp64), gate = x12[..., :hidden], up = x12[..., hidden:]; x12's dtype out."""
    gate, up = x12.to(torch.promote_types(x12.dtype, torch.float32)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x12.dtype)


@triton.jit
def _swiglu_fwd_kernel(X, Y, stride_x, stride_y, HIDDEN, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # gate: first half
    u = tl.load(X + row * stride_x + HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)  # up: second half
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DY, DX, stride_x, stride_dy, stride_dx, HIDDEN, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    d_up = dy * silu
    d_gate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DX + row * stride_dx + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + HIDDEN + cols, d_up.to(DX.dtype.element_ty), mask=mask)


def _block(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), 1024)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x12: torch.Tensor):
        two_h = x12.shape[-1]
        hidden = two_h // 2
        x2 = _rows(x12, two_h)  # (M, 2 * hidden)
        M = x2.shape[0]
        y = torch.empty((M, hidden), dtype=x12.dtype, device=x12.device)
        block = _block(hidden)
        _swiglu_fwd_kernel[(M, triton.cdiv(hidden, block))](x2, y, x2.stride(0), y.stride(0), hidden, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.in_shape = x12.shape
        return y.view(*x12.shape[:-1], hidden)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (x2,) = ctx.saved_tensors
        M, two_h = x2.shape
        hidden = two_h // 2
        dy2 = _rows(dy, hidden)
        dx = torch.empty_like(x2)
        block = _block(hidden)
        _swiglu_bwd_kernel[(M, triton.cdiv(hidden, block))](
            x2, dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0), hidden, BLOCK=block
        )
        return dx.view(ctx.in_shape)


def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """x12 [..., 2 * hidden] (the w12 output; gate first) -> silu(gate) * up, [..., hidden], x12's dtype."""
    if x12.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even (gate and up halves), got {x12.shape[-1]}")
    return SwiGLUFunc.apply(x12)
