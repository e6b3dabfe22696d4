"""Fused LayerNorm / rotary / SwiGLU Triton kernels against their fp32 references, forward and backward.

CPU through TRITON_INTERPRET=1 (these kernels have no `tl.dot`, so bf16 runs correctly in the interpreter too).
Error budget: max|kernel - ref| <= 2 * max|torch_same_dtype - ref| + atol, with ref the `*_ref` run in fp64 (so an
fp32 kernel is judged against something more exact than itself) and atol two rounding units of the dtype at the
reference's magnitude.
"""


import torch

# TRITON_INTERPRET=1 is set by tests/conftest.py (without CUDA), before any test module imports triton.

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from t2i_kernels.layer_norm import layer_norm, layer_norm_ref  # noqa: E402
from t2i_kernels.rotary import rotary, rotary_cos_sin, rotary_ref  # noqa: E402
from t2i_kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _grads(fn, inputs, douts):
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return list(outs) + list(torch.autograd.grad(outs, inputs, douts))


def _upstream(shape, dtype, seed):
    """Random upstream gradient with ~1/4 of the rows (all but the last dim) zeroed, as ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=gen)
    d[torch.rand(shape[:-1], generator=gen) < 0.25] = 0.0
    return d.to(DEVICE, dtype)


def _check(names, ours, same, ref64, dtype):
    for name, o, s, r in zip(names, ours, same, ref64):
        assert o.shape == r.shape and o.dtype == s.dtype, name
        err = (o.double() - r).abs()
        err_same = (s.double() - r).abs()
        rr = r.to(dtype)
        atol = 2 * ((rr + 0.3 - 0.3) - rr).abs().max().item() + 1e-6
        print(f"{name}: kernel max {err.max():.3e} mean {err.mean():.3e} | torch {dtype} max {err_same.max():.3e} "
              f"mean {err_same.mean():.3e} | atol {atol:.1e}")
        assert err.max() <= 2 * err_same.max() + atol, name


# ---------------------------------------------------------------- LayerNorm -------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 33), (1, 1, 64), (2, 7, 2048)])
def test_layer_norm(shape, dtype):
    N = shape[-1]
    x = _randn(*shape, dtype=dtype, seed=0) * 3 + 1  # non-zero mean: the two-pass variance matters
    w, b = _randn(N, dtype=dtype, seed=1), _randn(N, dtype=dtype, seed=2)
    dy = _upstream(shape, dtype, seed=3)
    ours = _grads(layer_norm, (x, w, b), dy)
    same = _grads(lambda x_, w_, b_: F.layer_norm(x_, (N,), w_, b_, 1e-5), (x, w, b), dy)
    ref64 = _grads(layer_norm_ref, (x.double(), w.double(), b.double()), dy.double())
    _check(("y", "dx", "dw", "db"), ours, same, ref64, dtype)


def test_layer_norm_backward_is_deterministic():
    x, w, b = _randn(37, 96, dtype=torch.float32, seed=4), _randn(96, dtype=torch.float32, seed=5), \
        _randn(96, dtype=torch.float32, seed=6)
    dy = _upstream((37, 96), torch.float32, seed=7)
    first, second = _grads(layer_norm, (x, w, b), dy), _grads(layer_norm, (x, w, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# ---------------------------------------------------------------- rotary ----------------------------------
def _rotary_same_dtype(q, k, cos, sin):
    """Plain torch in the input dtype, as open_lm's RotaryEmbedding computes it (tables cast to x's dtype)."""
    def rot(x):
        c = torch.cat((cos, cos), -1).unsqueeze(-2).to(x.dtype)
        s = torch.cat((sin, sin), -1).unsqueeze(-2).to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat((-x2, x1), -1) * s

    return rot(q), rot(k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample_positions", [False, True])
def test_rotary(dtype, per_sample_positions):
    B, S, H, D = 2, 9, 3, 32
    fused = _randn(B, S, 3 * H * D, dtype=dtype, seed=0)  # q, k as strided views of the fused in_proj output
    q, k, _ = (t.view(B, S, H, D) for t in fused.chunk(3, -1))
    if per_sample_positions:  # [B, S]: e.g. left-padded prompts in a batch
        positions = torch.stack([torch.arange(3, 3 + S), torch.arange(100, 100 + S)]).to(DEVICE)
    else:  # KV-cache offset of 5
        positions = torch.arange(5, 5 + S, device=DEVICE)
    cos, sin = rotary_cos_sin(positions, D)
    dq, dk = _upstream((B, S, H, D), dtype, seed=1), _upstream((B, S, H, D), dtype, seed=2)
    ours = _grads(lambda a, b: rotary(a, b, cos, sin), (q, k), (dq, dk))
    same = _grads(lambda a, b: _rotary_same_dtype(a, b, cos, sin), (q, k), (dq, dk))
    ref64 = _grads(lambda a, b: rotary_ref(a, b, cos, sin), (q.double(), k.double()), (dq.double(), dk.double()))
    _check(("q_rot", "k_rot", "dq", "dk"), ours, same, ref64, dtype)


def test_rotary_offset_equals_slice_of_longer_table():
    q, k = _randn(1, 12, 2, 16, dtype=torch.float32, seed=3), _randn(1, 12, 2, 16, dtype=torch.float32, seed=4)
    full = rotary(q, k, *rotary_cos_sin(torch.arange(12, device=DEVICE), 16))
    tail = rotary(q[:, 5:], k[:, 5:], *rotary_cos_sin(torch.arange(5, 12, device=DEVICE), 16))
    assert torch.equal(tail[0], full[0][:, 5:]) and torch.equal(tail[1], full[1][:, 5:])


def test_rotary_preserves_scores_at_equal_relative_offsets():
    """Half-split rotary is relative: <R(p) q, R(p') k> depends only on p - p'."""
    q, k = _randn(1, 1, 1, 32, dtype=torch.float32, seed=5), _randn(1, 1, 1, 32, dtype=torch.float32, seed=6)
    def score(pq, pk):
        rq, _ = rotary(q, q, *rotary_cos_sin(torch.tensor([pq], device=DEVICE), 32))
        rk, _ = rotary(k, k, *rotary_cos_sin(torch.tensor([pk], device=DEVICE), 32))
        return (rq * rk).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- SwiGLU ----------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 80), (2, 2 * 1100)])  # hidden 40; hidden 1100 > one 1024 block
def test_swiglu(shape, dtype):
    x12 = _randn(*shape, dtype=dtype, seed=0) * 2
    dy = _upstream((*shape[:-1], shape[-1] // 2), dtype, seed=1)
    ours = _grads(swiglu, (x12,), dy)
    same = _grads(lambda t: F.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1], (x12,), dy)
    ref64 = _grads(swiglu_ref, (x12.double(),), dy.double())
    _check(("y", "dx12"), ours, same, ref64, dtype)


def test_swiglu_gate_is_the_first_half():
    gate, up = _randn(4, 8, dtype=torch.float32, seed=2), _randn(4, 8, dtype=torch.float32, seed=3)
    torch.testing.assert_close(swiglu(torch.cat((gate, up), -1)), F.silu(gate) * up, rtol=0, atol=1e-6)


def test_input_checks():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        layer_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="cos/sin"):
        q = torch.zeros(1, 4, 2, 16, device=DEVICE)
        rotary(q, q, *rotary_cos_sin(torch.arange(3, device=DEVICE), 16))
