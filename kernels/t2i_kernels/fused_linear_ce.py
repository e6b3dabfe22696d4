"""Fused linear + cross-entropy in Triton that never materialises the full [N, V] logits.

Math
----
Tokens n (rows of ``h [N, H]``), vocabulary entries v (rows of ``w [V, H]``), targets ``t [N]``:

    z[n, v]  = <h[n, :], w[v, :]>                                   fp32 accumulation
    lse[n]   = log sum_v exp z[n, v]                                 online, one [BLOCK_N, BLOCK_V] tile at a time
    loss[n]  = lse[n] - z[n, t[n]]   if t[n] != ignore_index, else 0 fp32 per-token loss

``z[n, t[n]]`` is read from the same fp32 tile that feeds the log-sum-exp, so ``loss >= 0`` up to the rounding
of one ``exp``/``log`` (clamped at 0). For any upstream gradient ``g[n] = dL/dloss[n]`` (set to 0 on ignored rows):

    dz[n, v] = g[n] * (exp(z[n, v] - lse[n]) - [v == t[n]])
    dh       = dz @ w        [N, H]
    dw       = dz^T @ h      [V, H]

Design
------
Forward, ``_lce_fwd_kernel``: grid (token blocks, vocabulary splits of ``V_PER_SPLIT`` columns). Each program
walks its split tile by tile, computing a [BLOCK_N, BLOCK_V] logits tile with ``tl.dot`` (K loop over H), and
keeps a running max ``m``, running sum ``s = sum exp(z - m)`` and the target logit. The per-split partials
``(m, s)`` [S, N] are merged by a few fixed-order torch ops (``lse = M + log sum_s s_s exp(m_s - M)``), the split
scheme of the verl/NVIDIA per-token kernel: enough programs to fill the GPU at small N, no locks, no atomics.
The split width is a constant, so the merge order of a row's log-sum-exp depends neither on N nor on the GPU.
Only ``lse`` (fp32, [N]) is saved for backward.

Backward (Cut-Cross-Entropy style recompute): the vocabulary is walked in chunks of ``C_v`` columns.
For each chunk: (1) ``_lce_bwd_dlogits_kernel`` recomputes the logits tile by tile and writes
``dz[:, chunk]`` [N, C_v] in the input dtype; (2) ``dw[chunk] = dz^T @ h`` with ``_matmul_kernel`` — complete,
since the reduction over all N tokens happens inside one fp32 register accumulator, written once in w's dtype;
(3) ``dh += dz @ w[chunk]`` accumulated in an fp32 [N, H] buffer across chunks (``_matmul_kernel`` loads the
previous fp32 partial into its accumulator), the last chunk writing h's dtype. Chunking over V rather than N puts
the cross-chunk accumulator on dh (N*H*4 bytes, 75 MiB at N=9,216, H=2,048) instead of dw (V*H*4, 522 MiB) and
lets dw be written once. Every output element is owned by one program and reduced in a fixed order, so results
are bit-identical run to run (no atomics; block sizes fixed, not autotuned, so the order does not change between
processes either). Why not CCE's fully fused backward: H = 2,048 is too wide to keep a dh or dw row block in
registers, so fusing both GEMMs into the logits kernel needs atomic adds, whose order is not fixed; the price of
determinism here is dz, materialised one bounded chunk at a time.

FLOPs: forward 2NHV; backward 6NHV (recompute + dh + dw) = 8NHV in total.

Memory bound (beyond inputs, outputs and the [N] loss/lse):
    forward:   (2S + 1) * N * 4 bytes of split partials (S = ceil(V / V_PER_SPLIT) = 17; 1.2 MiB at N=9,216)
    backward:  N * C_v * sizeof(dtype) for dz  (C_v chosen so this is <= ``max_dlogits_elems``, 2^27 elements =
               256 MiB in bf16 by default) + N * H * 4 bytes for the fp32 dh accumulator (only when C_v < V and
               h is not fp32).
Never O(N * V) unless the caller asks for it with ``vocab_chunk``.

torch.compile: the launchers are wrapped as ``torch.library`` custom ops, ``torch.ops.t2i.fused_lce_fwd`` (h, w,
targets -> loss, lse) and ``torch.ops.t2i.fused_lce_bwd`` (-> dh, dw), with fake implementations for the output
shapes and the backward registered as the forward op's autograd formula. Without them Dynamo would have to trace
into the autograd.Function, the launchers and Triton's launch machinery (under the CPU interpreter that fails, and
fullgraph=True errors); with them it keeps each op as one opaque node, never traced into, and AOTAutograd puts
the backward op in the compiled backward graph. The op bodies are the same launchers, so eager and compiled runs
give the same bits (tests/test_compile.py).

Preconditions: targets in [0, V) or equal to ``ignore_index`` (checked on device with ``torch._assert_async``,
no host sync). Tests run the kernels on CPU tensors with ``TRITON_INTERPRET=1``, which must be set before this
module is imported (``triton.jit`` picks the interpreter at decoration time).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from t2i_kernels._common import dot_precision, interpreting, require_device


# ----------------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ("super-grouping") order of a 1-D launch over a [num_m, num_n] tile grid, for L2 reuse."""
    num_pid_in_group = GROUP_M * num_n
    group_id = pid // num_pid_in_group
    first_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _logits_tile(
    x_ptr, w_ptr,                   # x [N, H], w [V, H]
    rows, cols,                     # [BLOCK_N] int64, [BLOCK_V] int64
    row_mask, col_mask,             # [BLOCK_N], [BLOCK_V]
    H, stride_xn, stride_xh, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """z = x[rows] @ w[cols]^T as a [BLOCK_N, BLOCK_V] fp32 tile; masked rows/cols read zeros."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xn + offs_h[None, :] * stride_xh      # [BLOCK_N, BLOCK_H]
    w_ptrs = w_ptr + offs_h[:, None] * stride_wh + cols[None, :] * stride_wv      # [BLOCK_H, BLOCK_V] (w^T tile)
    for k0 in range(0, H, BLOCK_H):
        h_mask = offs_h < H - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H * stride_wh
    return acc


@triton.jit
def _lce_fwd_kernel(
    x_ptr, w_ptr, tgt_ptr,          # x [N, H], w [V, H], targets [N] int
    m_ptr, s_ptr, zt_ptr,           # out: split max [S, N], split sum-exp [S, N] (fp32), target logit [N] (fp32)
    N, V, H,
    stride_xn, stride_xh, stride_wv, stride_wh,
    ignore_index,
    V_PER_SPLIT: tl.constexpr,      # columns per split, a multiple of BLOCK_V
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1. This program: token block pid_n, vocabulary split [v_lo, v_hi). Offsets are int64 from here on.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)                  # [BLOCK_N]
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    v_lo = pid_s * V_PER_SPLIT                                                    # V < 2^31: int32 is exact here
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)

    # 2. Online log-sum-exp over the split. Every tile holds >= 1 valid column (v_lo < V), so m is finite after
    #    the first tile and exp(m - m_new) never sees (-inf) - (-inf).
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)                     # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)                                   # running sum exp(z - m)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)                                  # target logit, if in split
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)                          # [BLOCK_V]
        col_mask = cols < v_hi
        z = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                         stride_xn, stride_xh, stride_wv, stride_wh,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)                # [BLOCK_N, BLOCK_V] fp32
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # 3. Target logit from the same fp32 tile (at most one column matches per row).
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    # 4. Write the split partials; the target logit only from the split that owns the target column.
    tl.store(m_ptr + pid_s * N + rows, m, mask=row_mask)
    tl.store(s_ptr + pid_s * N + rows, s, mask=row_mask)
    tl.store(zt_ptr + rows, zt, mask=row_mask & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _lce_bwd_dlogits_kernel(
    x_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr,   # x [N, H], w [Vc, H] (this chunk), targets [N], lse [N], g [N] fp32
    dz_ptr,                                  # out: dz [N, Vc] in the input dtype
    N, Vc, H, col_offset,                    # col_offset: vocabulary id of the chunk's first column
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dzn, stride_dzv,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Tile (pid_n, pid_v) of the [N, Vc] chunk, in grouped order.
    pid_n, pid_v = _tile_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(Vc, BLOCK_V), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)      # [BLOCK_N]
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)      # [BLOCK_V], chunk-local
    row_mask = rows < N
    col_mask = cols < Vc

    # 2. Recompute the fp32 logits tile (same K loop as the forward).
    z = _logits_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                     stride_xn, stride_xh, stride_wv, stride_wh,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)                    # [BLOCK_N, BLOCK_V]

    # 3. dz = g * (softmax - onehot); g = 0 on ignored rows (a select, so a NaN upstream grad there stays out).
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where(tgt != ignore_index, g, 0.0)
    p = tl.exp(z - lse[:, None])                                                  # softmax, fp32
    is_tgt = (cols[None, :] + col_offset) == tgt[:, None]
    dz = g[:, None] * (p - is_tgt.to(tl.float32))

    # 4. Store in the input dtype (the operand precision of the two GEMMs that consume it).
    dz_ptrs = dz_ptr + rows[:, None] * stride_dzn + cols[None, :] * stride_dzv
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, acc_ptr,            # c [M, N] = a [M, K] @ b [K, N] (+ acc [M, N] fp32)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_accm, stride_accn,
    ACCUMULATE: tl.constexpr,                # load acc as the initial fp32 accumulator (acc may alias c)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Output tile (pid_m, pid_n), grouped order; int64 offsets.
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)        # [BLOCK_M]
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)        # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K).to(tl.int64)                                       # [BLOCK_K]
    m_mask = rm < M
    n_mask = rn < N

    # 2. fp32 accumulator, optionally continuing a previous partial sum.
    if ACCUMULATE:
        acc_ptrs = acc_ptr + rm[:, None] * stride_accm + rn[None, :] * stride_accn
        acc = tl.load(acc_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # 3. K loop, in a fixed order (deterministic).
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak            # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn            # [BLOCK_K, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # 4. Store, casting to c's dtype (fp32 for an intermediate partial, the parameter dtype for the last one).
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# 2. Pure-torch reference
# ----------------------------------------------------------------------------------------------------------------


def linear_cross_entropy_ref(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """fp32 reference: ``cross_entropy(h.float() @ w.float().T, targets, reduction='none')`` -> [N] fp32.

    Materialises the full [N, V] fp32 logits: for tests and small shapes only.
    """
    logits = h.float() @ w.float().T                                              # [N, V] fp32
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers, custom ops with their autograd formula, public API
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LCEConfig:
    """Block sizes. Fixed rather than autotuned, so the reduction order (and the bits) never change between runs."""

    block_n: int            # tokens per logits tile (forward and dz kernels)
    block_v: int            # vocabulary entries per logits tile
    block_h: int            # hidden-dim step of the logits K loop
    v_per_split: int        # forward: vocabulary columns per program (multiple of block_v)
    group: int              # grouped tile order for L2 reuse (dz kernel and GEMMs)
    gemm_m: int             # GEMM output tile rows
    gemm_n: int             # GEMM output tile cols
    gemm_n_acc: int         # ... for the GEMMs that continue an fp32 partial (dh after the first vocab chunk)
    gemm_k: int             # GEMM K step
    num_warps: int
    num_stages: int
    max_dlogits_elems: int  # cap on the dz chunk [N, C_v]: C_v = max_dlogits_elems // N (rounded, balanced)


# 16-bit operands: the Triton matmul tutorial tiles (HGMMA 64x256 on sm_90a), except that a GEMM continuing an
# fp32 partial keeps a 128 x 128 tile: at 128 x 256 its loaded partial plus the accumulator need more than 255
# registers and spill (240 B on sm_90a, 8-16 B on sm_80), at 128 x 128 it spills nothing on either (HGMMA 64x128).
# fp32 operands (tests; FMA products, ieee): 64 x 128 tiles with a K step of 16 and two stages, the largest that do
# not spill (the 16-bit tiles with K = 32 spilled inside every loop). Chosen from the compile gate's table
# (benchmarks/README_compile.md); not yet timed on a GPU (benchmarks/README_fused_ce.md).
_CUDA_CONFIG_16BIT = LCEConfig(block_n=128, block_v=128, block_h=64, v_per_split=4096, group=8,
                               gemm_m=128, gemm_n=256, gemm_n_acc=128, gemm_k=64, num_warps=8, num_stages=3,
                               max_dlogits_elems=2**27)
_CUDA_CONFIG_FP32 = LCEConfig(block_n=64, block_v=128, block_h=16, v_per_split=4096, group=8,
                              gemm_m=64, gemm_n=128, gemm_n_acc=128, gemm_k=16, num_warps=8, num_stages=2,
                              max_dlogits_elems=2**27)
# Interpreter (CPU tests): the smallest tiles tl.dot accepts, small splits so tests cover the split merge.
_INTERPRET_CONFIG = LCEConfig(block_n=16, block_v=32, block_h=16, v_per_split=128, group=4,
                              gemm_m=16, gemm_n=32, gemm_n_acc=32, gemm_k=16, num_warps=4, num_stages=1,
                              max_dlogits_elems=2**27)


def _config_for(dtype: torch.dtype) -> LCEConfig:
    if interpreting():
        return _INTERPRET_CONFIG
    return _CUDA_CONFIG_FP32 if dtype == torch.float32 else _CUDA_CONFIG_16BIT


def _check_inputs(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> None:
    if h.dim() != 2 or w.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"expected h [N, H], w [V, H], targets [N]; got {tuple(h.shape)}, {tuple(w.shape)}, "
                         f"{tuple(targets.shape)}")
    if h.shape[1] != w.shape[1] or h.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, w {tuple(w.shape)}, targets {tuple(targets.shape)}")
    if h.dtype != w.dtype or h.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"h and w must share a dtype among bf16/fp16/fp32; got {h.dtype}, {w.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32/int64, got {targets.dtype}")
    if not (h.device == w.device == targets.device):
        raise ValueError(f"h, w, targets on different devices: {h.device}, {w.device}, {targets.device}")
    require_device(h, "fused linear-CE (use impl='chunked' on CPU)")


def _lce_forward(h, w, targets, ignore_index: int, cfg: LCEConfig):
    """Returns (loss [N] fp32, lse [N] fp32)."""
    N, H = h.shape
    V = w.shape[0]
    S = triton.cdiv(V, cfg.v_per_split)
    m_part = torch.empty(S, N, device=h.device, dtype=torch.float32)             # [S, N]
    s_part = torch.empty(S, N, device=h.device, dtype=torch.float32)             # [S, N]
    z_tgt = torch.zeros(N, device=h.device, dtype=torch.float32)                 # [N]
    grid = (triton.cdiv(N, cfg.block_n), S)
    _lce_fwd_kernel[grid](
        h, w, targets, m_part, s_part, z_tgt,
        N, V, H, h.stride(0), h.stride(1), w.stride(0), w.stride(1), ignore_index,
        V_PER_SPLIT=cfg.v_per_split, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        DOT_PRECISION=dot_precision(h.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # Split merge: [S, N] -> [N], fixed order (a few tiny ops; every split has a finite max).
    m_max = m_part.amax(dim=0)                                                    # [N]
    lse = m_max + torch.log((s_part * torch.exp(m_part - m_max)).sum(dim=0))      # [N]
    valid = targets != ignore_index
    loss = torch.where(valid, (lse - z_tgt).clamp_min(0.0), 0.0)                  # [N]
    return loss, lse


def _launch_matmul(a, b, out, acc, cfg: LCEConfig, precision: str) -> None:
    """out [M, N] = a [M, K] @ b [K, N] (+ acc, fp32); any strides."""
    M, K = a.shape
    N = b.shape[1]
    accumulate = acc is not None
    block_n = cfg.gemm_n_acc if accumulate else cfg.gemm_n
    grid = (triton.cdiv(M, cfg.gemm_m) * triton.cdiv(N, block_n),)
    acc = acc if accumulate else out                                              # unused pointer when not accumulating
    _matmul_kernel[grid](
        a, b, out, acc, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        acc.stride(0), acc.stride(1),
        ACCUMULATE=accumulate, BLOCK_M=cfg.gemm_m, BLOCK_N=block_n, BLOCK_K=cfg.gemm_k, GROUP_M=cfg.group,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _vocab_chunk(N: int, V: int, cfg: LCEConfig) -> int:
    """Columns per backward chunk: dz [N, C_v] <= max_dlogits_elems, chunks balanced, multiple of block_v."""
    cap = max(cfg.block_v, cfg.max_dlogits_elems // max(N, 1))
    n_chunks = triton.cdiv(V, cap)
    return triton.cdiv(triton.cdiv(V, n_chunks), cfg.block_v) * cfg.block_v


def _lce_backward(h, w, targets, lse, dloss, ignore_index: int, vocab_chunk: int | None,
                  need_dh: bool, need_dw: bool, cfg: LCEConfig):
    """Returns (dh or None, dw or None)."""
    N, H = h.shape
    V = w.shape[0]
    prec = dot_precision(h.dtype)
    g = dloss.float().contiguous()                                                # [N] (may arrive stride-0)
    Cv = min(vocab_chunk or _vocab_chunk(N, V, cfg), V)
    n_chunks = triton.cdiv(V, Cv)

    dh = torch.empty_like(h) if need_dh else None                                 # [N, H]
    dw = torch.empty_like(w) if need_dw else None                                 # [V, H]
    # fp32 accumulator for dh across vocabulary chunks (dh itself when it is fp32 or when one chunk suffices).
    dh32 = None
    if need_dh and n_chunks > 1:
        dh32 = dh if h.dtype == torch.float32 else torch.empty(N, H, device=h.device, dtype=torch.float32)
    dz_buf = torch.empty(N, Cv, device=h.device, dtype=h.dtype)                   # [N, C_v]

    for c in range(n_chunks):
        v0, v1 = c * Cv, min((c + 1) * Cv, V)
        w_c = w[v0:v1]                                                            # [Vc, H] view
        dz = dz_buf[:, : v1 - v0]                                                 # [N, Vc] view
        # (1) dz for this chunk.
        grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(v1 - v0, cfg.block_v),)
        _lce_bwd_dlogits_kernel[grid](
            h, w_c, targets, lse, g, dz,
            N, v1 - v0, H, v0,
            h.stride(0), h.stride(1), w_c.stride(0), w_c.stride(1), dz.stride(0), dz.stride(1),
            ignore_index,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group,
            DOT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # (2) dw[chunk] = dz^T @ h, complete over all N tokens in one fp32 accumulator.
        if need_dw:
            _launch_matmul(dz.t(), h, dw[v0:v1], None, cfg, prec)
        # (3) dh (+)= dz @ w[chunk]; fp32 partials between chunks, the last chunk writes dh's dtype.
        if need_dh:
            last = c == n_chunks - 1
            _launch_matmul(dz, w_c, dh if last else dh32, None if c == 0 else dh32, cfg, prec)
    return dh, dw


# Custom ops for torch.compile (see the module docstring): forward and backward ops, fake implementations for
# their output shapes, and the autograd formula that links them. `vocab_chunk` is an argument of the forward op
# only so that the backward can see it.


@torch.library.custom_op("t2i::fused_lce_fwd", mutates_args=())
def _fused_lce_fwd(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, vocab_chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, lse [N] fp32) of h [N, H], w [V, H], targets [N]; ``vocab_chunk`` is for the backward."""
    return _lce_forward(h, w, targets.contiguous(), ignore_index, _config_for(h.dtype))


@_fused_lce_fwd.register_fake
def _(h, w, targets, ignore_index, vocab_chunk):
    N = h.shape[0]
    return h.new_empty(N, dtype=torch.float32), h.new_empty(N, dtype=torch.float32)      # loss [N], lse [N]


@torch.library.custom_op("t2i::fused_lce_bwd", mutates_args=())
def _fused_lce_bwd(
    dloss: torch.Tensor, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, vocab_chunk: int | None, need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh [N, H], dw [V, H]); a gradient that is not needed comes back as an empty [0] tensor (ops return no None)."""
    dh, dw = _lce_backward(h, w, targets.contiguous(), lse, dloss, ignore_index, vocab_chunk, need_dh, need_dw,
                           _config_for(h.dtype))
    return (dh if need_dh else h.new_empty(0)), (dw if need_dw else w.new_empty(0))


@_fused_lce_bwd.register_fake
def _(dloss, h, w, targets, lse, ignore_index, vocab_chunk, need_dh, need_dw):
    return (torch.empty_like(h) if need_dh else h.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _fused_lce_setup_context(ctx, inputs, output):
    h, w, targets, ignore_index, vocab_chunk = inputs
    _, lse = output
    ctx.save_for_backward(h, w, targets, lse)                                     # lse: the only new [N] tensor
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index, ctx.vocab_chunk = ignore_index, vocab_chunk


def _fused_lce_backward(ctx, dloss, _dlse):
    h, w, targets, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = _fused_lce_bwd(dloss, h, w, targets, lse, ctx.ignore_index, ctx.vocab_chunk, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


_fused_lce_fwd.register_autograd(_fused_lce_backward, setup_context=_fused_lce_setup_context)


def fused_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    vocab_chunk: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``h @ w.T`` against ``targets`` without the [N, V] logits.

    Args:
        h: [N, H] hidden states, bf16/fp16/fp32 (any strides).
        w: [V, H] output projection, same dtype as h.
        targets: [N] int32/int64 ids in [0, V) or ``ignore_index``.
        ignore_index: target id that contributes 0 loss and 0 gradient.
        vocab_chunk: backward vocabulary chunk C_v (default: dz [N, C_v] capped at 2^27 elements).
    Returns:
        [N] fp32 loss, 0 at ignored rows. Differentiable w.r.t. h and w for any upstream gradient.
    """
    _check_inputs(h, w, targets)
    if h.shape[0] == 0:  # no tokens: the reference handles it (empty logits) and keeps the graph connected
        return linear_cross_entropy_ref(h, w, targets, ignore_index)
    targets = targets.contiguous()
    # Device-side range check (no host sync); an out-of-range id would otherwise be silently dropped.
    torch._assert_async(((targets >= 0) & (targets < w.shape[0]) | (targets == ignore_index)).all())
    loss, _ = _fused_lce_fwd(h, w, targets, ignore_index, vocab_chunk)
    return loss
