"""Triton FlashAttention (t2i_kernels.flash_attn) against the fp32 reference, forward and backward.

CPU: TRITON_INTERPRET=1, small odd shapes, fp32 and fp16 (the interpreter's bf16 `tl.dot` is wrong; bf16 is
covered by the CUDA tests). Error budget: max|kernel - ref| <= 2 * max|torch_same_dtype - ref| + atol, with ref
`attention_ref` run in fp64 (so fp32 kernels meet something more exact than themselves) and atol two rounding
units of the dtype at the reference's magnitude (flash-attn's test recipe).
"""


import torch

# TRITON_INTERPRET=1 is set by tests/conftest.py (without CUDA), before any test module imports triton.

import pytest  # noqa: E402

from t2i_kernels._common import interpreting  # noqa: E402
from t2i_kernels.flash_attn import _flash_attn_forward, attention_ref, flash_attention  # noqa: E402


# The small cases run on CPU tensors through the interpreter. On a CUDA machine without TRITON_INTERPRET=1 the
# kernels refuse CPU tensors, so they skip there: the GPU cases below cover the compiled kernels.
cpu_interpreter = pytest.mark.skipif(torch.cuda.is_available() and not interpreting(),
                                     reason="CPU-tensor cases need the Triton interpreter (TRITON_INTERPRET=1)")


def _qkv(B, Sq, Sk, H, D, dtype, device="cpu", seed=0):
    """q, k, v as the model makes them: `.view`s of a fused projection output (strided, last dim contiguous)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if Sq == Sk:
        fused = torch.randn(B, Sq, 3 * H * D, generator=gen).to(device, dtype)  # (B, S, 3 * H * D)
        return [t.view(B, Sq, H, D) for t in fused.chunk(3, dim=-1)]  # 3 x (B, S, H, D), strided
    q = torch.randn(B, Sq, H, D, generator=gen).to(device, dtype)
    kv = torch.randn(B, Sk, 2 * H * D, generator=gen).to(device, dtype)
    return [q] + [t.view(B, Sk, H, D) for t in kv.chunk(2, dim=-1)]


def _upstream_grad(out, seed=1):
    """Random dO with ~1/4 of the query rows zeroed, as positions a loss ignores."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    do = torch.randn(out.shape, generator=gen)
    ignored = torch.rand(out.shape[:2], generator=gen) < 0.25  # (B, Sq)
    do[ignored] = 0.0
    return do.to(out.device, out.dtype)


def _rounding_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # Two rounding units of `dtype` at the reference's magnitude (flash-attn's `out_ref + 0.3 - 0.3` trick).
    r = ref.to(dtype)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item() + 1e-6


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _check_against_budget(q, k, v, causal, **kernel_kwargs):
    dtype = q.dtype
    do = _upstream_grad(torch.empty(q.shape, dtype=dtype, device=q.device))  # out has q's shape
    ours = _run(lambda a, b, c: flash_attention(a, b, c, causal, **kernel_kwargs), q, k, v, do)
    same = _run(lambda a, b, c: attention_ref(a, b, c, causal, upcast=False), q, k, v, do)
    ref64 = _run(lambda a, b, c: attention_ref(a, b, c, causal), q.double(), k.double(), v.double(), do.double())
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, same, ref64):
        err = (o.double() - r).abs()
        err_same = (s.double() - r).abs()
        atol = _rounding_atol(r, dtype)
        print(f"{name}: kernel max {err.max():.3e} mean {err.mean():.3e} | "
              f"torch {dtype} max {err_same.max():.3e} mean {err_same.mean():.3e} | atol {atol:.1e}")
        assert torch.isfinite(o).all(), name
        assert err.max() <= 2 * err_same.max() + atol, name


CPU_CASES = [  # (B, H, Sq, Sk, D, causal, dtype)
    (1, 2, 1, 1, 32, True, torch.float32),
    (2, 2, 17, 17, 32, True, torch.float16),
    (1, 2, 77, 77, 64, False, torch.float32),
    (1, 2, 77, 77, 64, True, torch.float16),
    (1, 1, 65, 65, 128, True, torch.float32),
    (1, 2, 100, 100, 128, True, torch.float16),
    (1, 2, 5, 40, 32, True, torch.float32),  # KV cache: the queries are the last 5 positions
    (1, 2, 1, 37, 64, True, torch.float16),  # single-token decode step
    (2, 2, 7, 23, 64, False, torch.float16),  # rectangular, no mask
]


@cpu_interpreter
@pytest.mark.parametrize("B,H,Sq,Sk,D,causal,dtype", CPU_CASES)
def test_forward_backward_within_error_budget(B, H, Sq, Sk, D, causal, dtype):
    q, k, v = _qkv(B, Sq, Sk, H, D, dtype)
    _check_against_budget(q, k, v, causal)


@cpu_interpreter
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 16)])
@pytest.mark.parametrize("Sq,Sk", [(50, 50), (19, 50)])
def test_block_shapes_and_diagonal_alignment(block_m, block_n, Sq, Sk):
    """Unequal tiles put the causal diagonal (bottom-right aligned when Sq < Sk) at every offset in a tile."""
    q, k, v = _qkv(1, Sq, Sk, 2, 32, torch.float32, seed=3)
    _check_against_budget(q, k, v, True, block_m=block_m, block_n=block_n)


@cpu_interpreter
def test_lse_is_the_row_logsumexp():
    q, k, v = _qkv(2, 33, 33, 2, 32, torch.float32)
    _, lse = _flash_attn_forward(q, k, v, True, 32**-0.5)  # (B, H, Sq)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 32**-0.5
    scores = scores.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=1e-5)


@cpu_interpreter
def test_kv_cache_rows_match_full_attention():
    q, k, v = _qkv(1, 40, 40, 2, 32, torch.float32, seed=5)
    full = flash_attention(q, k, v, True)
    last = flash_attention(q[:, -6:], k, v, True)
    torch.testing.assert_close(last, full[:, -6:], rtol=0, atol=1e-6)


@cpu_interpreter
def test_deterministic():
    q, k, v = _qkv(2, 45, 45, 2, 64, torch.float16, seed=7)
    do = _upstream_grad(torch.empty(2, 45, 2, 64, dtype=torch.float16))
    first = _run(lambda a, b, c: flash_attention(a, b, c, True), q, k, v, do)
    second = _run(lambda a, b, c: flash_attention(a, b, c, True), q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_input_checks():
    q, k, v = _qkv(1, 8, 8, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        flash_attention(q, k[:, :4], v[:, :4], True)
    with pytest.raises(ValueError, match="head dim 48"):
        flash_attention(*(torch.zeros(1, 8, 2, 48) for _ in range(3)))
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, k.half(), v, True)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        flash_attention(q[0], k, v, True)


# ---------------------------------------------------------------- GPU: real shapes, bf16 ------------------
@pytest.mark.requires_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B", [2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_1152_tokens(B, causal, dtype):
    q, k, v = _qkv(B, 1152, 1152, 16, 128, dtype, device="cuda")
    _check_against_budget(q, k, v, causal)


@pytest.mark.requires_cuda
def test_cuda_kv_cache_and_determinism():
    q, k, v = _qkv(4, 1152, 1152, 16, 128, torch.bfloat16, device="cuda")
    _check_against_budget(q[:, -100:], k, v, True)
    do = _upstream_grad(torch.empty(4, 1152, 16, 128, dtype=torch.bfloat16, device="cuda"))
    first = _run(lambda a, b, c: flash_attention(a, b, c, True), q, k, v, do)
    second = _run(lambda a, b, c: flash_attention(a, b, c, True), q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.requires_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
    reason="needs a CUDA GPU with >= 60 GiB",
)
def test_cuda_64bit_offsets():
    """B * S * H * D > 2**31 elements: the last batch entries sit past int32 offsets (~36 GB in use)."""
    B, S, H, D = 912, 1152, 16, 128
    assert B * S * H * D > 2**31
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    out, dq, dk, dv = _run(lambda a, b, c: flash_attention(a, b, c, True), q, k, v, do)
    for idx in (0, B - 1):  # compare a low and a high batch entry against the kernel run on that slice alone
        sl = slice(idx, idx + 1)
        ref = _run(lambda a, b, c: flash_attention(a, b, c, True), q[sl], k[sl], v[sl], do[sl])
        for got, want in zip((out, dq, dk, dv), ref):
            assert torch.equal(got[sl], want), idx
    del q, k, v, do, out, dq, dk, dv
    torch.cuda.empty_cache()
