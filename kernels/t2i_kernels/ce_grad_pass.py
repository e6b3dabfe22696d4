"""The one Triton pass of the sum-mode cross-entropy: log-sum-exp, per-token loss and d(loss)/d(logits) in place.

Trio: the Triton kernel ``_ce_grad_pass_kernel``, the pure-torch reference ``ce_grad_pass_ref``, and the launcher
``ce_grad_pass`` (a ``torch.library`` custom op, ``torch.ops.t2i.ce_grad_pass``, that mutates its logits argument).
The driver around it (token chunks, the cuBLAS matmuls, autograd) is ``t2i_kernels.ce_sum``.

Math, for one chunk of C tokens with logits ``z [C, V]`` (the GEMM's output, in the input dtype) and targets t:

    lse[n]   = log sum_v exp z[n, v]             fp32, online over blocks of BLOCK_V columns, fixed order
    loss[n]  = lse[n] - z[n, t[n]]  (>= 0)       0 where t[n] == ignore_index
    dz[n, v] = exp(z[n, v] - lse[n]) - [v == t[n]]     written over z (input dtype); 0 on ignored rows

``dz`` is the gradient of ``sum_n loss[n]`` w.r.t. the logits, i.e. for an upstream gradient of 1: the sum mode
scales the finished dh / dw by the actual upstream scalar in backward. The target logit is read from the same
stored value that feeds the log-sum-exp, so ``loss >= 0`` up to one exp/log rounding (clamped at 0).

One program per token row; a row of V = 66,822 bf16 logits is 130 KiB, read twice and written once, so the pass
is memory bound: 3 x N x V x 2 bytes = 3.7 GB at N = 9,216 (~0.9 ms at 4 TB/s), next to ~10 ms of matmuls.
Deterministic: each row is reduced by one program in a fixed block order; no atomics. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from t2i_kernels._common import interpreting, require_device

# (BLOCK_V, num_warps). GPU: 4,096 columns per step, 16 per thread at 8 warps (two 16-byte loads in bf16).
# Interpreter: small blocks, so a 370-column test vocabulary takes several steps and a ragged last one.
_GPU_BLOCK_V, _GPU_WARPS = 4096, 8
_INTERPRET_BLOCK_V = 64


def ce_grad_pass_ref(z: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference: (loss [C] fp32, dz [C, V] fp32) from logits z [C, V]; z is not modified."""
    zf = z.float()                                                                # [C, V]
    valid = targets != ignore_index                                               # [C]
    safe = torch.where(valid, targets, 0).long()
    logp = torch.log_softmax(zf, dim=-1)                                          # [C, V]
    loss = torch.where(valid, -logp.gather(1, safe[:, None]).squeeze(1), 0.0)     # [C]
    dz = logp.exp() - torch.nn.functional.one_hot(safe, z.shape[1]).float()       # softmax - onehot
    return loss, torch.where(valid[:, None], dz, 0.0)


@triton.jit
def _ce_grad_pass_kernel(
    Z, TGT, LOSS,                 # Z [C, V] logits, overwritten with dz when WRITE_GRAD; TGT [C]; LOSS [C] fp32
    V, stride_z, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # 1. One program per token row; 64-bit row offset (C * V exceeds 2^31 at C = 32,768).
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(TGT + row).to(tl.int64)
    valid = t != ignore_index

    # 2. Online log-sum-exp over the row in fp32, block by block in a fixed order.
    m = tl.full((), float("-inf"), tl.float32)                                    # running max
    s = tl.zeros((), tl.float32)                                                  # running sum of exp(z - m)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z = tl.load(z_row + c, mask=c < V, other=float("-inf")).to(tl.float32)    # [BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)

    # 3. Loss from the stored target logit (the value the sum above saw); 0 on ignored rows.
    hit = valid & (t >= 0) & (t < V)
    z_t = tl.load(z_row + tl.where(hit, t, 0), mask=hit, other=0.0).to(tl.float32)
    loss = tl.where(valid, tl.maximum(lse - z_t, 0.0), 0.0)
    tl.store(LOSS + row, loss)

    # 4. dz = softmax - onehot, over the logits in place; ignored rows get exact zeros.
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
            dz = tl.exp(z - lse) - tl.where(c == t, 1.0, 0.0)
            dz = tl.where(valid, dz, 0.0)
            tl.store(z_row + c, dz.to(Z.dtype.element_ty), mask=c < V)


def launch_ce_grad_pass(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Run the kernel on z [C, V] (rows contiguous) and targets [C]; returns loss [C] fp32. The launcher proper
    (also what the compile gate runs on meta tensors)."""
    C, V = z.shape
    loss = torch.empty(C, device=z.device, dtype=torch.float32)                   # [C]
    if C == 0:
        return loss
    block_v, warps = (_INTERPRET_BLOCK_V, 1) if interpreting() else (_GPU_BLOCK_V, _GPU_WARPS)
    _ce_grad_pass_kernel[(C,)](
        z, targets, loss, V, z.stride(0), ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps,
    )
    return loss


@torch.library.custom_op("t2i::ce_grad_pass", mutates_args=("z",))
def ce_grad_pass(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """loss [C] fp32 of logits z [C, V]; with ``write_grad`` z is overwritten with dz = softmax - onehot."""
    if z.dim() != 2 or z.stride(1) != 1 or targets.shape != z.shape[:1]:
        raise ValueError(f"ce_grad_pass: z must be [C, V] with contiguous rows and targets [C]; got "
                         f"{tuple(z.shape)} (strides {z.stride()}), {tuple(targets.shape)}")
    require_device(z, "ce_grad_pass")
    return launch_ce_grad_pass(z, targets.contiguous(), ignore_index, write_grad)


@ce_grad_pass.register_fake
def _(z, targets, ignore_index, write_grad):
    return z.new_empty(z.shape[0], dtype=torch.float32)                           # loss [C]
