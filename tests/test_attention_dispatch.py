"""The model's attention entry point: every backend agrees with "eager", KV-cache alignment, input checks."""

import os

import torch

# TRITON_INTERPRET=1 is set by tests/conftest.py (without CUDA), before any test module imports triton.

import pytest  # noqa: E402

from t2i_ds.model.attention import (  # noqa: E402
    VALID_BACKENDS,
    _eager_masked,
    attention,
    auto_choices,
    available_backends,
    decode_attention,
    decode_attention_bias,
    padded_causal_mask,
    reset_auto_choices,
)
from t2i_kernels.flash_attn import attention_ref  # noqa: E402


def requires_cuda(fn):
    return pytest.mark.requires_cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def _qkv(B, Sq, Sk, H, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fused = torch.randn(B, Sk, 3 * H * D, generator=gen).to(device, dtype)  # the fused in_proj output
    q, k, v = (t.view(B, Sk, H, D) for t in fused.chunk(3, dim=-1))  # strided views, as the model passes them
    return q[:, Sk - Sq:], k, v


def _budget_check(got, ref, same_dtype, dtype, what):
    """max|got - ref| <= 2 * max|same_dtype - ref| + atol; ref is computed in a wider dtype than `dtype`."""
    err = (got.double() - ref.double()).abs()
    err_same = (same_dtype.double() - ref.double()).abs()
    r = ref.to(dtype)
    atol = 2 * ((r + 0.3 - 0.3) - r).abs().max().item() + 1e-6
    print(f"{what}: max {err.max():.3e} mean {err.mean():.3e} | same-dtype torch max {err_same.max():.3e} "
          f"| atol {atol:.1e}")
    assert err.max() <= 2 * err_same.max() + atol, what


def _outputs_and_grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


CPU_BACKENDS = available_backends("cpu")


def test_cpu_availability():
    assert {"sdpa", "sdpa_math", "eager"} <= set(CPU_BACKENDS)
    assert "flash_attn" not in CPU_BACKENDS and "auto" not in CPU_BACKENDS
    assert set(CPU_BACKENDS) <= set(VALID_BACKENDS)
    assert ("triton" in CPU_BACKENDS) == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Sq,Sk,causal", [(29, 29, True), (29, 29, False), (6, 29, True), (1, 29, True)])
def test_backend_matches_eager(backend, Sq, Sk, causal):
    """fp32, output and all three gradients: every backend within the error budget of "eager" (the fp32 torch
    result), both measured against the same math in fp64."""
    q, k, v = _qkv(2, Sq, Sk, 2, 32, seed=Sq + Sk)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = _outputs_and_grads(lambda a, b, c: attention(a, b, c, causal=causal, backend=backend), q, k, v, do)
    eager = _outputs_and_grads(lambda a, b, c: attention(a, b, c, causal=causal, backend="eager"), q, k, v, do)
    ref64 = _outputs_and_grads(lambda a, b, c: attention_ref(a, b, c, causal, upcast=False),
                               q.double(), k.double(), v.double(), do.double())
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, eager, ref64):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        _budget_check(g, r, e, torch.float32, f"{backend} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_rows_are_the_last_rows_of_full_attention(backend):
    q, k, v = _qkv(2, 23, 23, 2, 32, seed=11)
    full = attention(q, k, v, causal=True, backend=backend)  # (B, 23, H, D)
    for sq in (1, 4, 23):
        last = attention(q[:, -sq:], k, v, causal=True, backend=backend)  # queries are positions 23 - sq ..
        torch.testing.assert_close(last, full[:, -sq:], rtol=0, atol=2e-6)


def test_auto_on_cpu_is_sdpa():
    q, k, v = _qkv(2, 17, 17, 2, 32)
    assert torch.equal(attention(q, k, v, backend="auto"), attention(q, k, v, backend="sdpa"))
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="sdpa"))  # "auto" is the default


def test_fp16_sdpa_within_budget_of_eager():
    q, k, v = _qkv(1, 31, 31, 2, 64, dtype=torch.float16)
    ref32 = attention(q.float(), k.float(), v.float(), backend="eager")
    same = attention_ref(q, k, v, True, upcast=False)  # plain torch in fp16
    _budget_check(attention(q, k, v, backend="sdpa"), ref32, same, torch.float16, "sdpa fp16")


def test_unknown_backend_lists_the_valid_ones():
    q, k, v = _qkv(1, 4, 4, 1, 32)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'.*sdpa.*triton.*eager"):
        attention(q, k, v, backend="xformers")


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "rank 4"),
        (lambda q, k, v: (q, k[:, :, :1], v), ValueError, "same shape"),
        (lambda q, k, v: (q[:, :, :1], k[:, :, :1], v[:, :, :1]), None, None),  # fewer heads everywhere is fine
        (lambda q, k, v: (q[..., :16], k, v), ValueError, "agree in B, H and D"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "not supported"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), ValueError, "Sq <= Sk"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, "Sk == 0"),
    ],
)
def test_input_checks(make, error, match):
    q, k, v = _qkv(1, 6, 6, 2, 32)
    args = make(q, k, v)
    if error is None:
        assert attention(*args, backend="sdpa").shape == args[0].shape
    else:
        with pytest.raises(error, match=match):
            attention(*args, backend="sdpa")


def test_non_causal_allows_more_queries_than_keys():
    q, k, v = _qkv(1, 6, 6, 2, 32)
    out = attention(q, k[:, :3], v[:, :3], causal=False, backend="sdpa")
    want = attention(q, k[:, :3], v[:, :3], causal=False, backend="eager")
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- GPU ------------------------------------
@requires_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_backends_match_eager_bf16(causal):
    backends = available_backends("cuda")
    assert {"sdpa", "triton", "eager"} <= set(backends)
    q, k, v = _qkv(2, 1152, 1152, 16, 128, dtype=torch.bfloat16, device="cuda")
    ref32 = attention(q.float(), k.float(), v.float(), causal=causal, backend="eager")
    same = attention_ref(q, k, v, causal, upcast=False)
    for backend in backends:
        _budget_check(attention(q, k, v, causal=causal, backend=backend), ref32, same, torch.bfloat16, backend)


@requires_cuda
def test_cuda_auto_measures_once_and_caches():
    reset_auto_choices()
    q, k, v = _qkv(2, 1152, 1152, 16, 128, dtype=torch.bfloat16, device="cuda")
    first = attention(q, k, v)
    choices = auto_choices()
    assert len(choices) == 1
    (chosen,) = choices.values()
    assert chosen in available_backends("cuda") and chosen not in ("eager", "sdpa_math")
    assert torch.equal(attention(q, k, v), first)  # cached: same backend, deterministic forward
    assert torch.equal(first, attention(q, k, v, backend=chosen))
    attention(q[:, -1:], k, v)  # decode shape: a second key, timed separately
    assert len(auto_choices()) == 2


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_the_masked_reference(causal, dtype):
    """The CPU decode path (one query over a cache, explicit softmax) = the masked path's fp64 reference within the
    error budget of SDPA in the same dtype; left-padded rows of different lengths, odd sizes (B=3, H=5, Sk=37, D=24).
    causal: the query is the last key and sees it even when the mask says padded; False: the mask alone decides."""
    B, Sk, H, D = 3, 37, 5, 24
    q, k, v = _qkv(B, 1, Sk, H, D, dtype, seed=3)  # (B, 1, H, D), (B, Sk, H, D)
    mask = torch.arange(Sk)[None, :] >= torch.tensor([0, 4, 11])[:, None]  # (B, Sk): 0, 4, 11 pads
    if causal:
        mask[1, -1] = False  # the query's own key: attended all the same (the module docstring's rule)
    full = padded_causal_mask(mask, 1, causal)  # (B, 1, 1, Sk)
    ref = _eager_masked(q.double(), k.double(), v.double(), full)  # (B, 1, H, D) fp64
    same = attention(q, k, v, causal=causal, backend="sdpa", key_padding_mask=mask)
    bias = decode_attention_bias(mask, H, dtype, causal)  # (B * H, 1, Sk)
    k3, v3 = (t.transpose(1, 2).reshape(B * H, Sk, D) for t in (k, v))  # the cache's (B, H, S, D) layout, flattened
    got = decode_attention(q.transpose(1, 2).reshape(B * H, 1, D), k3, v3, bias).view(B, H, 1, D).transpose(1, 2)
    _budget_check(got, ref, same, dtype, f"decode causal={causal} {dtype}")
    unmasked = decode_attention(q.transpose(1, 2).reshape(B * H, 1, D), k3, v3, None).view(B, H, 1, D).transpose(1, 2)
    _budget_check(unmasked, _eager_masked(q.double(), k.double(), v.double(), torch.ones_like(full)),
                  attention(q, k, v, causal=True, backend="sdpa"), dtype, f"decode unmasked {dtype}")
