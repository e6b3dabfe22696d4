"""Fused rotary position embedding, half-split (GPT-NeoX) convention, for q and k in [B, S, H, D], in Triton.

Trio: `_rotary_kernel`, the pure-torch `rotary_ref`, the autograd op `RotaryFunc` / `rotary`. This is open_lm's
correct `rotary` (sequence-dim positions, full head dim, theta = 10000), for new models; the released 1B uses
`head_rotary`, which is numerically a no-op (reference/open_lm_1b.md section 1.5). Not wired into the model.

Math, with x = [x1, x2] split in halves of D/2, position p and inv_freq_i = base^(-2i/D), i < D/2:

    theta_i = p * inv_freq_i
    y1 = x1 * cos(theta) - x2 * sin(theta)        (= x * cat(cos, cos) + rotate_half(x) * cat(sin, sin),
    y2 = x2 * cos(theta) + x1 * sin(theta)            rotate_half(x) = cat(-x2, x1))

The backward is the transposed (inverse) rotation: the same kernel with sin -> -sin. Angles come from
`rotary_cos_sin` (fp32, as open_lm builds its cached tables); positions carry any KV-cache offset, or a
per-sample position tensor [B, S].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (int) [S] or [B, S] -> cos, sin in fp32, [S, D/2] or [B, S, D/2].

    For a KV cache with `offset` past tokens: positions = torch.arange(offset, offset + S).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., S, D/2)
    return freqs.cos(), freqs.sin()


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
    c = torch.cat((cos, cos), dim=-1).unsqueeze(-2).to(acc)  # (..., S, 1, D), broadcast over heads
    s = torch.cat((sin, sin), dim=-1).unsqueeze(-2).to(acc)
    xf = x.to(acc)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Half-split rotary on q, k [B, S, H, D] with cos, sin [S, D/2] or [B, S, D/2].

    Math in fp32 (fp64 stays fp64); results in the input dtypes.
    """
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


@triton.jit
def _rotate_heads(X, Y, stride_xh, stride_yh, heads, h_mask, d, cos, sin, HALF: tl.constexpr):
    x_ptrs = X + heads[:, None] * stride_xh + d[None, :]
    y_ptrs = Y + heads[:, None] * stride_yh + d[None, :]
    x1 = tl.load(x_ptrs, mask=h_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_H, D/2)
    x2 = tl.load(x_ptrs + HALF, mask=h_mask[:, None], other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=h_mask[:, None])
    tl.store(y_ptrs + HALF, y2.to(Y.dtype.element_ty), mask=h_mask[:, None])


@triton.jit
def _rotary_kernel(
    Q, K, OQ, OK, COS, SIN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ob, stride_os, stride_oh,  # OQ and OK are allocated alike
    stride_cb, stride_cs,  # stride_cb = 0 when the tables are shared by the batch
    S, H,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr,
):
    # 1. One program per token (b, s): load its angles once, rotate all heads of q and of k.
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    d = tl.arange(0, HALF)
    heads = tl.arange(0, BLOCK_H)
    h_mask = heads < H
    cos = tl.load(COS + b * stride_cb + s * stride_cs + d)  # (D/2,) fp32
    sin = tl.load(SIN + b * stride_cb + s * stride_cs + d)
    if INVERSE:  # backward: R(theta)^T = R(-theta)
        sin = -sin
    # 2. Rotate; 64-bit token offsets.
    out = b * stride_ob + s * stride_os
    _rotate_heads(Q + b * stride_qb + s * stride_qs, OQ + out, stride_qh, stride_oh, heads, h_mask, d, cos, sin, HALF)
    _rotate_heads(K + b * stride_kb + s * stride_ks, OK + out, stride_kh, stride_oh, heads, h_mask, d, cos, sin, HALF)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool):
    B, S, H, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    oq = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    ok = torch.empty((B, S, H, D), dtype=k.dtype, device=k.device)
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    _rotary_kernel[(B * S,)](
        q, k, oq, ok, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        oq.stride(0), oq.stride(1), oq.stride(2), stride_cb, cos.stride(-2),
        S, H, HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), INVERSE=inverse,
        num_warps=4 if H * D >= 2048 else 1,
    )
    return oq, ok


class RotaryFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, cos, sin, inverse=True)
        return dq, dk, None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k [B, S, H, D] by angles cos, sin [S, D/2] or [B, S, D/2] (from `rotary_cos_sin`).

    Returns new contiguous (q_rot, k_rot) in the input dtypes; math in fp32.
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"rotary: q and k must both be [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, S, H, D = q.shape
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"rotary: head dim must be twice a power of two, got {D}")
    want = [(S, D // 2), (B, S, D // 2)]
    if cos.shape != sin.shape or tuple(cos.shape) not in want:
        raise ValueError(f"rotary: cos/sin must be {want[0]} or {want[1]}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    return RotaryFunc.apply(q, k, cos, sin)
