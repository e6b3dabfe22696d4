"""Fused linear + cross-entropy (Triton) and the chunked torch path against an fp32 reference.

Tolerances follow the error budget of STYLE.md:
    max|impl - ref32| <= 2 * max|torch_same_dtype - ref32| + atol
for the loss, dh and dw, with random upstream gradients (per-token weights), ignored rows at random positions,
targets in every modality of a tiny text/image/special vocabulary, and N, H, V not multiples of any block.

Without CUDA the Triton kernels run on CPU tensors through the interpreter (small shapes; bf16 dots are wrong in
the interpreter, so bf16 is covered by the CUDA tests). With CUDA the same small tests run compiled on the GPU,
plus the real shape and a 64-bit-offset case.
"""

import pytest
import torch

from t2i_kernels import cross_entropy
from t2i_kernels import fused_linear_ce as flce
from t2i_kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_torch
from t2i_kernels.cross_entropy import linear_cross_entropy, modality_sums
from tests.kernel_setup import (BOUNDARIES, DEVICE, HAS_CUDA, IGNORE, KERNEL_DTYPES, N_IMAGE, T_TEXT,
                                V_SMALL, in_process, rerun_in_interpreter)

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def make_problem(N, H, V, dtype, *, ignore_frac=0.2, seed=0, device=DEVICE, h_strided=False):
    """h [N, H], w [V, H], targets [N] covering text/image/special, ignored rows at random positions, weights [N]."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, 2 * H if h_strided else H, generator=gen)
    h = (h[:, ::2] if h_strided else h).to(dtype)                         # strided: stride(1) == 2
    w = (torch.randn(V, H, generator=gen) / H**0.5 * 2.0).to(dtype)      # logits std ~2: a peaked softmax
    targets = torch.randint(0, V, (N,), generator=gen)
    bounds = (0, *BOUNDARIES, V) if V == V_SMALL else (0, V)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):               # at least one target per modality
        targets[i] = torch.randint(lo, hi, (1,), generator=gen).item()
    ignored = torch.rand(N, generator=gen) < ignore_frac
    ignored[: len(bounds) - 1] = False
    targets[ignored] = IGNORE
    weights = torch.rand(N, generator=gen) * 2.0 - 0.5                   # random upstream grads, some negative
    return h.to(device), w.to(device), targets.to(device), weights.to(device)


def loss_and_grads(fn, h, w, targets, weights):
    """fn(h, w, targets) -> loss [N]; returns (loss, dh, dw) for the objective sum(loss * weights)."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    (loss * weights).sum().backward()
    return loss.detach(), h.grad, w.grad


def reference_and_baseline(h, w, targets, weights):
    """(fp32 reference, plain torch in the inputs' dtype), each as (loss, dh, dw)."""
    ref32 = loss_and_grads(lambda a, b, t: flce.linear_cross_entropy_ref(a, b, t, IGNORE),
                           h.float(), w.float(), targets, weights)
    lowp = loss_and_grads(lambda a, b, t: linear_cross_entropy_torch(a, b, t, IGNORE), h, w, targets, weights)
    return ref32, lowp


def assert_within_budget(name, out, ref32, lowp, atol_rel=1e-6):
    """max|out - ref32| <= 2 * max|lowp - ref32| + atol, atol = atol_rel * (1 + max|ref32|)."""
    err = (out.float() - ref32).abs()
    base = (lowp.float() - ref32).abs()
    atol = atol_rel * (1.0 + ref32.abs().max().item())
    print(f"{name:>10}: impl max {err.max().item():.3e} mean {err.mean().item():.3e} | "
          f"torch same dtype max {base.max().item():.3e} mean {base.mean().item():.3e} | atol {atol:.1e}")
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err.max().item() <= 2.0 * base.max().item() + atol, f"{name}: outside the error budget"


def check_against_reference(fn, h, w, targets, weights):
    out = loss_and_grads(fn, h, w, targets, weights)
    ref32, lowp = reference_and_baseline(h, w, targets, weights)
    for name, o, r, l in zip(("loss", "dh", "dw"), out, ref32, lowp):
        assert o.dtype == (torch.float32 if name == "loss" else h.dtype), name
        assert_within_budget(name, o, r, l)
    loss = out[0]
    ignored = targets == IGNORE
    assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored])), "ignored rows must have exactly 0 loss"
    assert (loss >= 0).all(), "cross-entropy is non-negative"
    return out


def fused(vocab_chunk=None):
    return lambda h, w, t: flce.fused_linear_cross_entropy(h, w, t, IGNORE, vocab_chunk=vocab_chunk)


def chunked(chunk_tokens):
    return lambda h, w, t: chunked_linear_cross_entropy(h, w, t, IGNORE, chunk_tokens=chunk_tokens)


# --------------------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU, compiled on GPU): small shapes
# --------------------------------------------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("vocab_chunk", [None, 100], ids=["one_chunk", "chunks_of_100"])
def test_fused_matches_reference(dtype, vocab_chunk):
    # N = 53, H = 40, V = 370: no dimension is a multiple of a block; vocab_chunk=100 takes 4 backward chunks
    # (fp32 dh accumulation across chunks, a ragged last chunk).
    h, w, targets, weights = make_problem(53, 40, V_SMALL, dtype)
    check_against_reference(fused(vocab_chunk), h, w, targets, weights)


@in_process
@pytest.mark.parametrize("N,H", [(5, 16), (16, 24)], ids=["N_below_block", "N_one_block"])
def test_fused_small_and_strided(N, H):
    # Fewer tokens than a block; h a strided view (stride(1) == 2), so the kernels must honour strides; int32 ids.
    h, w, targets, weights = make_problem(N, H, V_SMALL, torch.float32, h_strided=True, seed=1)
    targets = targets.int()
    assert not h.is_contiguous()
    check_against_reference(fused(), h, w, targets, weights)


@in_process
def test_fused_all_ignored_gives_zeros():
    h, w, targets, weights = make_problem(21, 32, V_SMALL, torch.float32, seed=2)
    targets = torch.full_like(targets, IGNORE)
    loss, dh, dw = loss_and_grads(fused(), h, w, targets, weights)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@in_process
def test_fused_nan_upstream_grad_on_ignored_rows_stays_out():
    # Ignored rows contribute nothing, even if the upstream gradient there is NaN (a select, not a multiply).
    h, w, targets, weights = make_problem(21, 32, V_SMALL, torch.float32, seed=3)
    weights = torch.where(targets == IGNORE, float("nan"), weights)
    assert (targets == IGNORE).any()
    _, dh, dw = loss_and_grads(fused(), h, w, targets, weights)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()


@in_process
def test_fused_is_bit_identical_across_runs():
    h, w, targets, weights = make_problem(53, 40, V_SMALL, torch.float16, seed=4)
    first = loss_and_grads(fused(100), h, w, targets, weights)
    second = loss_and_grads(fused(100), h, w, targets, weights)
    for name, a, b in zip(("loss", "dh", "dw"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@in_process
def test_fused_only_needed_grads():
    # w frozen: backward computes dh only (and the same dh as with both).
    h, w, targets, weights = make_problem(37, 32, V_SMALL, torch.float32, seed=5)
    hh = h.clone().requires_grad_()
    (flce.fused_linear_cross_entropy(hh, w, targets, IGNORE) * weights).sum().backward()
    _, dh_both, _ = loss_and_grads(fused(), h, w, targets, weights)
    assert torch.equal(hh.grad, dh_both)


@in_process
def test_fused_rejects_bad_inputs():
    h, w, targets, _ = make_problem(8, 16, V_SMALL, torch.float32)
    with pytest.raises(TypeError):
        flce.fused_linear_cross_entropy(h, w.half(), targets)
    with pytest.raises(ValueError):
        flce.fused_linear_cross_entropy(h, w[:, :8], targets)
    with pytest.raises(TypeError):
        flce.fused_linear_cross_entropy(h, w, targets.float())
    if not HAS_CUDA:  # on CUDA the device-side assert would poison the context for the other tests
        bad = targets.clone()
        bad[3] = V_SMALL
        with pytest.raises(RuntimeError):
            flce.fused_linear_cross_entropy(h, w, bad)


# --------------------------------------------------------------------------------------------------------------
# Chunked torch path
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_tokens", [16, 4096], ids=["4_chunks", "one_chunk"])
def test_chunked_matches_reference(dtype, chunk_tokens):
    h, w, targets, weights = make_problem(53, 40, V_SMALL, dtype, seed=6)
    check_against_reference(chunked(chunk_tokens), h, w, targets, weights)


def test_chunked_all_ignored_and_determinism():
    h, w, targets, weights = make_problem(29, 32, V_SMALL, torch.bfloat16, seed=7)
    first = loss_and_grads(chunked(8), h, w, targets, weights)
    second = loss_and_grads(chunked(8), h, w, targets, weights)
    for name, a, b in zip(("loss", "dh", "dw"), first, second):
        assert torch.equal(a, b), f"chunked {name} differs between two identical runs"
    loss, dh, dw = loss_and_grads(chunked(8), h, w, torch.full_like(targets, IGNORE), weights)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_chunked_nan_upstream_grad_on_ignored_rows_stays_out():
    h, w, targets, weights = make_problem(21, 32, V_SMALL, torch.float32, seed=3)
    weights = torch.where(targets == IGNORE, float("nan"), weights)
    _, dh, dw = loss_and_grads(chunked(8), h, w, targets, weights)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()


# --------------------------------------------------------------------------------------------------------------
# Modality sums and the dispatcher
# --------------------------------------------------------------------------------------------------------------


def test_modality_sums_match_masked_reference():
    h, w, targets, _ = make_problem(61, 32, V_SMALL, torch.float32, seed=8)
    hh = h.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(hh, w, targets, IGNORE, chunk_tokens=16)
    sums, counts = modality_sums(loss, targets, BOUNDARIES, IGNORE)
    assert sums.shape == (3,) and counts.shape == (3,) and sums.dtype == torch.float32

    valid = targets != IGNORE
    masks = [valid & (targets < T_TEXT),
             valid & (targets >= T_TEXT) & (targets < T_TEXT + N_IMAGE),
             valid & (targets >= T_TEXT + N_IMAGE)]
    ref_sums = torch.stack([torch.where(m, loss, 0.0).sum() for m in masks])
    ref_counts = torch.stack([m.sum() for m in masks])
    print("sums", sums.tolist(), "ref", ref_sums.tolist(), "counts", counts.tolist())
    assert torch.equal(counts, ref_counts) and (counts > 0).all()
    assert counts.sum().item() == valid.sum().item(), "every valid target in exactly one bucket"
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-6)

    # Differentiable: d(sum of sums)/d(loss) is the validity mask, so it matches backprop of the masked sum.
    sums.sum().backward()
    h2 = h.clone().requires_grad_()
    ref_loss = chunked_linear_cross_entropy(h2, w, targets, IGNORE, chunk_tokens=16)
    torch.where(valid, ref_loss, 0.0).sum().backward()
    assert torch.equal(hh.grad, h2.grad)


def test_modality_sums_edge_cases():
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    targets = torch.tensor([IGNORE, 0, 5, 9, 10], dtype=torch.int32)   # 9 -> bucket 1, 10 -> bucket 2 (at bound)
    sums, counts = modality_sums(loss, targets, (5, 10), IGNORE)
    assert sums.tolist() == [2.0, 12.0, 16.0] and counts.tolist() == [1, 2, 1]
    sums, counts = modality_sums(loss, torch.full_like(targets, IGNORE), (5, 10), IGNORE)
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        modality_sums(loss, targets, (10, 5), IGNORE)


@in_process
def test_dispatcher_paths_agree():
    h, w, targets, weights = make_problem(37, 32, V_SMALL, torch.float32, seed=9)
    outs = {impl: loss_and_grads(lambda a, b, t, i=impl: linear_cross_entropy(a, b, t, IGNORE, impl=i),
                                 h, w, targets, weights)
            for impl in ("torch", "chunked", "triton", "auto")}
    ref32, lowp = reference_and_baseline(h, w, targets, weights)
    for impl, out in outs.items():
        for name, o, r, l in zip(("loss", "dh", "dw"), out, ref32, lowp):
            assert_within_budget(f"{impl}/{name}", o, r, l)
    expected_auto = "triton" if HAS_CUDA else "chunked"
    for a, b in zip(outs["auto"], outs[expected_auto]):
        assert torch.equal(a, b), f"impl='auto' should be {expected_auto} here"


def test_dispatcher_errors(monkeypatch):
    h, w, targets, _ = make_problem(8, 16, V_SMALL, torch.float32)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, targets, impl="cuda")
    monkeypatch.setattr(cross_entropy, "_TRITON_OK", False)                 # as on a machine without triton
    with pytest.raises(RuntimeError, match="triton"):
        linear_cross_entropy(h, w, targets, impl="triton")
    auto = linear_cross_entropy(h, w, targets, IGNORE, impl="auto")     # falls back to chunked
    assert torch.equal(auto, chunked_linear_cross_entropy(h, w, targets, IGNORE))


test_kernels_in_interpreter_subprocess = rerun_in_interpreter(__file__)


# --------------------------------------------------------------------------------------------------------------
# GPU: real shapes
# --------------------------------------------------------------------------------------------------------------

N_REAL, H_REAL, V_REAL = 1152 * 8, 2048, 66822


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.requires_cuda
def test_cuda_real_shape_bf16(impl):
    h, w, targets, weights = make_problem(N_REAL, H_REAL, V_REAL, torch.bfloat16, ignore_frac=0.1, seed=10)
    fn = fused() if impl == "triton" else chunked(4096)
    out = check_against_reference(fn, h, w, targets, weights)
    if impl == "triton":
        again = loss_and_grads(fn, h, w, targets, weights)
        for name, a, b in zip(("loss", "dh", "dw"), out, again):
            assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.requires_cuda
def test_cuda_real_shape_all_ignored_bf16():
    h, w, targets, weights = make_problem(1152, H_REAL, V_REAL, torch.bfloat16, seed=11)
    loss, dh, dw = loss_and_grads(fused(), h, w, torch.full_like(targets, IGNORE), weights)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.requires_cuda
def test_cuda_64bit_offsets():
    # N*H and N*V_chunk both exceed 2^31 elements: h (4.3 GB bf16) is indexed past 2^31 and so is the dz buffer
    # (vocab_chunk=V, 4.6 GB). Only the last LIVE rows have targets, so the reference needs just those rows.
    N, H, V, LIVE = 2**21 + 77, 1024, 1100, 256
    assert N * H > 2**31 and N * V > 2**31
    gen = torch.Generator(device="cuda").manual_seed(12)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(V, H, device="cuda", generator=gen) / H**0.5 * 2.0).to(torch.bfloat16)
    targets = torch.full((N,), IGNORE, device="cuda", dtype=torch.long)
    targets[-LIVE:] = torch.randint(0, V, (LIVE,), device="cuda", generator=gen)
    weights = torch.rand(N, device="cuda", generator=gen)
    loss, dh, dw = loss_and_grads(fused(vocab_chunk=V), h, w, targets, weights)
    assert torch.equal(loss[:-LIVE], torch.zeros_like(loss[:-LIVE]))
    assert torch.equal(dh[:-LIVE], torch.zeros_like(dh[:-LIVE]))
    ref32, lowp = reference_and_baseline(h[-LIVE:], w, targets[-LIVE:], weights[-LIVE:])
    for name, o, r, l in zip(("loss", "dh", "dw"), (loss[-LIVE:], dh[-LIVE:], dw), ref32, lowp):
        assert_within_budget(name, o, r, l)
