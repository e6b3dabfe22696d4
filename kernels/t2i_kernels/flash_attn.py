"""FlashAttention-2 forward and backward in Triton, on open_lm's [B, S, H, D] layout.

Trio: the Triton kernels (`_fwd_kernel`, `_bwd_preprocess_kernel`, `_bwd_dkdv_kernel`, `_bwd_dq_kernel`),
the pure-torch reference `attention_ref`, and the differentiable op `flash_attention`.

torch.compile: the launchers are `torch.library` custom ops, `torch.ops.t2i.flash_attn_fwd` (q, k, v -> O, LSE)
and `torch.ops.t2i.flash_attn_bwd` (-> dQ, dK, dV), with fake implementations for the output shapes and the
backward registered as the forward op's autograd formula. Without them Dynamo would have to trace into the
autograd.Function, the launchers and Triton's launch machinery (under the CPU interpreter that fails, and
fullgraph=True errors); with them it keeps each op as one opaque node, never traced into, and AOTAutograd puts the
backward op in the compiled backward graph. The op bodies are the same launchers, so eager and compiled runs give
the same bits (tests/test_compile.py).

Math, per batch b and head h, with s = softmax_scale (default 1/sqrt(D)) and diag = Sk - Sq:

    S_ij  = s * <q_i, k_j>            masked to -inf where j > i + diag when causal
    L_i   = logsumexp_j S_ij          (the "LSE", fp32, the only softmax statistic saved)
    P_ij  = exp(S_ij - L_i)
    O_i   = sum_j P_ij v_j

When Sq < Sk (decoding with a KV cache) the queries are the LAST Sq positions: the causal diagonal is aligned
to the bottom-right corner, so query i sees keys j <= i + Sk - Sq (as flash-attn >= 2.1 and open_lm's
rectangular mask). Sq > Sk with causal=True would leave query rows with no key at all and is rejected.

Forward (online softmax, Dao 2023 Alg. 1): a program owns BLOCK_M query rows and streams BLOCK_N keys at a
time, keeping a running max m_i, a running denominator l_i and an unnormalised fp32 accumulator:

    m_new = max(m_i, rowmax(S_blk));  alpha = exp(m_i - m_new);  P_blk = exp(S_blk - m_new)
    l_i   = alpha * l_i + rowsum(P_blk);  acc = alpha * acc + P_blk @ V_blk;  m_i = m_new
    O_i   = acc / l_i;  L_i = m_i + log(l_i)

Exponentials are `exp2` with log2(e) folded into the scale (one FMA per score instead of a mul + exp). Neither
S nor P ([Sq, Sk]) ever exists in memory: the forward saves only O and L.

Backward (FlashAttention-2, Dao 2023 Alg. 2), recomputing P from L block by block:

    Delta_i = sum_d dO_id O_id        (= sum_j P_ij dP_ij;  `_bwd_preprocess_kernel`)
    dP_ij   = <dO_i, v_j>
    dS_ij   = P_ij (dP_ij - Delta_i)
    dV_j    = sum_i P_ij dO_i         \\  `_bwd_dkdv_kernel`: one program per key block,
    dK_j    = s * sum_i dS_ij q_i     /   looping over query blocks
    dQ_i    = s * sum_j dS_ij k_j         `_bwd_dq_kernel`: one program per query block, looping over key blocks

Every output block is written by exactly one program: no atomics, so the backward is deterministic (the cost is
recomputing P twice, which is what FA2 does too).

Masking: key loops run in two phases, a bulk phase over blocks that need no mask at all and a short phase over
the blocks crossed by the causal diagonal or by the end of the sequence (S need not be a multiple of a block).
Batch and head offsets are 64-bit (`b * stride_b` overflows int32 beyond 2**31 elements, e.g. B=912 at
S=1152, H=16, D=128). Inputs may be strided views (the model passes `.view`s of the fused in_proj output); only
the last dimension must be contiguous.

Block sizes on CUDA are fixed per head dim, dtype and architecture (`_gpu_config`), not autotuned: chosen from
the compile gate's register / spill / MMA table (benchmarks/README_compile.md), not yet timed on a GPU (see
benchmarks/README_attention.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from t2i_kernels._common import compiled_for_gpu, device_capability, dot_precision, require_device

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E); the kernels spell it (and ln 2) as literals
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Reference (pure torch). Tests and benchmarks import this one; the baseline never forks.
# --------------------------------------------------------------------------------------------------------------
def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Explicit-softmax attention on [B, S, H, D]; fp32 math when `upcast` (the default), else in q's dtype.

    `upcast=False` is "plain PyTorch in the same precision", the other half of the tests' error budget. The
    result is returned in q's dtype either way; fp64 inputs give an fp64 ground truth.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Sk - Sq), float("-inf"))  # bottom-right aligned diagonal
    probs = torch.softmax(scores, dim=-1)  # (B, H, Sq, Sk)
    return (probs @ vh).transpose(1, 2).to(q.dtype)  # (B, Sq, H, D)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _key_range(start_m, SEQ_Q, SEQ_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys seen by query rows [start_m, start_m + BLOCK_M): blocks below `full_end` need no mask, blocks in
    [full_end, hi) are crossed by the causal diagonal or by the end of the keys. full_end is a BLOCK_N multiple."""
    if CAUSAL:
        diag = SEQ_K - SEQ_Q
        hi = tl.minimum(SEQ_K, start_m + BLOCK_M + diag)  # last row of the block sees keys < hi
        full_end = tl.minimum(SEQ_K, start_m + diag + 1)  # first row of the block sees keys < full_end
        full_end = (full_end // BLOCK_N) * BLOCK_N
    else:
        hi = SEQ_K
        full_end = (SEQ_K // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, stride_ks, stride_vs,
    offs_m, offs_n, offs_d, lo, hi, qk_scale, diag, SEQ_K,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        k_ptrs = K + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k_valid = cols < SEQ_K
            k = tl.load(k_ptrs, mask=k_valid[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=k_valid[:, None], other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = k_valid[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
        # Online softmax. Every row sees key 0 in the first block it processes (Sq <= Sk when causal), so m_i is
        # finite after the first iteration and alpha / p never evaluate -inf - (-inf).
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) rescales the old statistics
        p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, SEQ_Q, SEQ_K,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Program -> (batch * head, query block). B*H is on grid axis 0 (limit 2**31 - 1, not 65535).
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh  # 64-bit base offsets
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * SEQ_Q  # LSE is a contiguous (B, H, Sq) fp32 tensor

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < SEQ_Q

    # 2. Load the query block once; it stays in registers/SMEM for the whole key loop.
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_valid[:, None], other=0.0)

    # 3. Stream the keys: bulk blocks without a mask, then the diagonal / ragged tail with one.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = SEQ_K - SEQ_Q
    full_end, hi = _key_range(start_m, SEQ_Q, SEQ_K, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               0, full_end, qk_scale, diag, SEQ_K, CAUSAL, False, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               full_end, hi, qk_scale, diag, SEQ_K, CAUSAL, True, BLOCK_N, DOT_PRECISION)

    # 4. Normalise, store O (input dtype) and the natural-log LSE (fp32) for the backward.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log (* ln 2)
    tl.store(O + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + offs_m, lse, mask=m_valid)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    H, SEQ_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Delta_i = sum_d dO_id * O_id in fp32, written to a contiguous (B, H, Sq) tensor.
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < SEQ_Q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=m_valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=m_valid[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos,
    offs_n, offs_m_base, offs_d, lo, hi, qk_scale, diag, SEQ_Q,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m_base  # (BLOCK_M,) query positions
        r_valid = rows < SEQ_Q
        q = tl.load(Q + rows[:, None] * stride_qs + offs_d[None, :], mask=r_valid[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dos + offs_d[None, :], mask=r_valid[:, None], other=0.0)
        # Rows past Sq get L = +inf, hence P = 0, and dO = 0: they add nothing, without a mask in the bulk phase.
        lse2 = tl.load(LSE + rows, mask=r_valid, other=float("inf")) * 1.4426950408889634  # log2 units
        delta = tl.load(DELTA + rows, mask=r_valid, other=0.0)
        # Work transposed, (keys, queries), so dK and dV accumulate without a transpose of the accumulators.
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            qkT = tl.where(offs_n[:, None] <= rows[None, :] + diag, qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse2[None, :])  # P^T, recomputed from the saved LSE
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)  # (BLOCK_N, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dP^T = V dO^T, (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # dS^T
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)  # (BLOCK_N, D), scaled after the loop
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,  # DK and DV are allocated alike and share strides
    H, SEQ_Q, SEQ_K,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Program -> (batch * head, key block); 64-bit base offsets.
    bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dkb + h * stride_dkh
    LSE += bh.to(tl.int64) * SEQ_Q
    DELTA += bh.to(tl.int64) * SEQ_Q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < SEQ_K

    # 2. Load this key/value block once. Keys past Sk load as 0; their rows of dK/dV are never stored, and in
    #    the causal case the mask already hides them from every real query (j >= Sk > i + diag).
    k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # 3. Loop over the query blocks that see this key block.
    diag = SEQ_K - SEQ_Q
    if CAUSAL:
        # Rows i >= start_n - diag see at least one key of the block; rows i >= start_n + BLOCK_N - 1 - diag see
        # all of them. Both bounds are rounded onto the BLOCK_M grid; blocks between them need the causal mask.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mask_end = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), SEQ_Q)
        mask_end = tl.maximum(((mask_end + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_m, offs_d,
                                 lo, mask_end, qk_scale, diag, SEQ_Q, True, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_m, offs_d,
                                 mask_end, SEQ_Q, qk_scale, diag, SEQ_Q, False, BLOCK_M, DOT_PRECISION)
    else:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_m, offs_d,
                                 0, SEQ_Q, qk_scale, diag, SEQ_Q, False, BLOCK_M, DOT_PRECISION)

    # 4. dK carries the softmax scale of S = s * QK^T; store both in the input dtype.
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DV + offs_n[:, None] * stride_dks + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K, V, stride_ks, stride_vs,
    offs_m, offs_n_base, offs_d, lo, hi, qk_scale, diag, SEQ_K,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n_base  # (BLOCK_N,) key positions
        k_ptrs = K + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k_valid = cols < SEQ_K
            k = tl.load(k_ptrs, mask=k_valid[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=k_valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = k_valid[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])  # P, recomputed
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])  # dS
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # (BLOCK_M, D), scaled after the loop
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    H, SEQ_Q, SEQ_K,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1. Program -> (batch * head, query block); 64-bit base offsets.
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += bh.to(tl.int64) * SEQ_Q
    DELTA += bh.to(tl.int64) * SEQ_Q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < SEQ_Q

    # 2. Load the query-side block: q, dO, LSE (log2 units; +inf past Sq so P = 0 there) and Delta.
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dos + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=m_valid, other=0.0)

    # 3. Same two-phase key loop as the forward.
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = SEQ_K - SEQ_Q
    full_end, hi = _key_range(start_m, SEQ_Q, SEQ_K, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                       0, full_end, qk_scale, diag, SEQ_K, CAUSAL, False, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                       full_end, hi, qk_scale, diag, SEQ_K, CAUSAL, True, BLOCK_N, DOT_PRECISION)

    # 4. Scale and store.
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def _gpu_config(head_dim: int, dtype: torch.dtype, capability: int) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on CUDA; BLOCK_M tiles queries, BLOCK_N keys.

    Chosen from the compile gate's table (`python -m t2i_kernels.compile_check`, benchmarks/README_compile.md):
    the widest tensor-core instruction with no spill, for each architecture; not yet timed on a GPU.
      * 16-bit, D = 128. Forward: FA2-tutorial tiles (128 x 64, 8 warps): HGMMA 64x128 on sm_90a. dQ: 64 x 64 on
        4 warps (one warpgroup) gives HGMMA 64x128 and 178 registers; the former 8 warps split every product into
        narrow 64x32 / 64x64 halves. dK/dV keeps two (BLOCK_N, D) fp32 accumulators: on sm_90a 128 keys x 64
        queries on 8 warps, single-stage, reach HGMMA 64x128 at 254 registers without a spill (two stages, or
        64 x 64 on 4 warps with two stages, spill); on sm_80 any of those spills in the loop, so it keeps 64 x 64
        on 8 warps, two stages (HMMA m16n8k16, 255 registers, no spill).
      * fp32 (tests only; products on the FMA units, ieee): 16 x 16 tiles, 4 warps, one stage. The 16-bit tiles
        need 224 KiB of shared memory in the forward (over the A100's 163 KiB) and spill heavily in every kernel;
        on sm_90a even 32 x 32 or 16 x 32 tiles spill, 16 x 16 stays at 67-106 registers.
    """
    if dtype == torch.float32:
        return {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "pre": (128, 0, 4, 1)}
    if head_dim <= 64:
        return {"fwd": (128, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "pre": (128, 0, 4, 1)}
    dkdv = (64, 128, 8, 1) if capability >= 90 else (64, 64, 8, 2)
    return {"fwd": (128, 64, 8, 3), "dkdv": dkdv, "dq": (64, 64, 4, 2), "pre": (128, 0, 4, 1)}


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, block_m: int | None, block_n: int | None):
    if compiled_for_gpu(device):
        cfg = _gpu_config(head_dim, dtype, device_capability(device))
    else:  # TRITON_INTERPRET=1: small blocks keep numpy temporaries small and still cover multi-block paths
        cfg = {name: (32, 32, 1, 1) for name in ("fwd", "dkdv", "dq", "pre")}
    if block_m is not None or block_n is not None:
        cfg = {
            name: (block_m or bm, block_n or bn, warps, stages) for name, (bm, bn, warps, stages) in cfg.items()
        }
    return cfg


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be [B, S, H, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, Sq, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, H or D")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"flash_attention: q, k, v must share one dtype of {SUPPORTED_DTYPES}, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {D} not supported, expected one of {SUPPORTED_HEAD_DIMS}")
    if k.shape[1] == 0:
        raise ValueError("flash_attention: no keys (Sk == 0)")
    if causal and Sq > k.shape[1]:
        raise ValueError(f"flash_attention: causal attention needs Sq <= Sk (queries are the last Sq positions), "
                         f"got Sq={Sq}, Sk={k.shape[1]}")
    require_device(q, "flash_attention")


def _flash_attn_forward(q, k, v, causal: bool, sm_scale: float, block_m=None, block_n=None):
    """Returns O [B, Sq, H, D] (input dtype, contiguous) and LSE [B, H, Sq] (fp32, natural log)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    o = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _config(D, q.dtype, q.device, block_m, block_n)["fwd"]
    grid = (B * H, triton.cdiv(Sq, bm))
    _fwd_kernel[grid](
        q, k, v, o, lse, sm_scale * LOG2E,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
        H, Sq, Sk,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def _flash_attn_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, block_m=None, block_n=None):
    """Returns dq, dk, dv, each contiguous [B, S, H, D] in the input dtype."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    cfg = _config(D, q.dtype, q.device, block_m, block_n)
    delta = torch.empty_like(lse)  # (B, H, Sq) fp32
    dq = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Sk, H, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Sk, H, D), dtype=v.dtype, device=v.device)
    precision = dot_precision(q.dtype)

    # 1. Delta = rowsum(dO * O).
    bm, _, warps, stages = cfg["pre"]
    _bwd_preprocess_kernel[(B * H, triton.cdiv(Sq, bm))](
        o, do, delta, *_strides3(o), *_strides3(do), H, Sq,
        HEAD_DIM=D, BLOCK_M=bm, num_warps=warps, num_stages=stages,
    )
    # 2. dK, dV: one program per key block.
    bm, bn, warps, stages = cfg["dkdv"]
    _bwd_dkdv_kernel[(B * H, triton.cdiv(Sk, bn))](
        q, k, v, do, lse, delta, dk, dv, sm_scale * LOG2E, sm_scale,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk),
        H, Sq, Sk,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    # 3. dQ: one program per query block.
    bm, bn, warps, stages = cfg["dq"]
    _bwd_dq_kernel[(B * H, triton.cdiv(Sq, bm))](
        q, k, v, do, lse, delta, dq, sm_scale * LOG2E, sm_scale,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        H, Sq, Sk,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


# Custom ops for torch.compile (see the module docstring): forward and backward ops, fake implementations for
# their output shapes, and the autograd formula that links them. The formula saves q, k, v, O and the fp32 LSE;
# nothing of size [Sq, Sk].


@torch.library.custom_op("t2i::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
    block_m: int | None, block_n: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B, Sq, H, D] in q's dtype, LSE [B, H, Sq] fp32) of q [B, Sq, H, D], k and v [B, Sk, H, D]."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _flash_attn_forward(q, k, v, causal, sm_scale, block_m, block_n)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, block_m, block_n):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("t2i::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, sm_scale: float, block_m: int | None, block_n: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), contiguous [B, S, H, D] in the input dtype."""
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    return _flash_attn_backward(do, q, k, v, o, lse, causal, sm_scale, block_m, block_n)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale, block_m, block_n):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    return q.new_empty((B, Sq, H, D)), k.new_empty((B, Sk, H, D)), v.new_empty((B, Sk, H, D))


def _flash_attn_setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, block_m, block_n = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.sm_scale, ctx.block_m, ctx.block_n = causal, sm_scale, block_m, block_n


def _flash_attn_backward_formula(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, ctx.block_m, ctx.block_n)
    return dq, dk, dv, None, None, None, None


_flash_attn_fwd_op.register_autograd(_flash_attn_backward_formula, setup_context=_flash_attn_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    *,
    softmax_scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton FlashAttention on [B, S, H, D]: q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D].

    Softmax scale 1/sqrt(D) unless given. With Sq < Sk the queries are the last Sq positions (bottom-right
    causal alignment). `block_m` / `block_n` override the tile sizes of all kernels (tests, tuning sweeps).
    """
    _check_inputs(q, k, v, causal)
    sm_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    o, _ = _flash_attn_fwd_op(q, k, v, causal, sm_scale, block_m, block_n)
    return o
