"""torch.compile traces the Triton kernels as torch.library custom ops: no graph break, same numbers as eager.

Ops (namespace ``t2i``): ``fused_lce_fwd`` / ``fused_lce_bwd`` (t2i_kernels.fused_linear_ce) and ``flash_attn_fwd``
/ ``flash_attn_bwd`` (t2i_kernels.flash_attn). Checked here:
  * ``torch.library.opcheck``: schema (no input mutated, no output aliasing an input), autograd registration,
    fake implementations against the real outputs (shape, dtype, strides), and AOTAutograd with dynamic shapes.
  * ``torch.compile(fullgraph=True, backend="aot_eager")`` of small functions around each public entry point,
    forward and backward: fullgraph proves there is no graph break; the recorded AOT graphs show the forward and
    backward ops as single nodes; results are bit-identical to eager (same kernels, same inputs).
  * On CUDA, the same through inductor (the op stays an opaque extern call; the ops around it are fused).

On CPU the kernels run in the Triton interpreter (fp32/fp16 only: its bf16 ``tl.dot`` is wrong), small shapes.
"""

import pytest
import torch
import torch._dynamo.testing
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from t2i_kernels import fused_linear_ce as flce
from t2i_kernels.cross_entropy import linear_cross_entropy
from t2i_kernels.flash_attn import flash_attention
from tests.kernel_setup import DEVICE, IGNORE, in_process, rerun_in_interpreter

OPS = torch.ops.t2i


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no cache or recompile budget carried between tests
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _lce_problem(N=37, H=40, V=150, dtype=torch.float32, seed=0, h_strided=False):
    """h [N, H] (optionally a stride-2 view), w [V, H], targets [N] with ignored rows, upstream weights [N]."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, 2 * H if h_strided else H, generator=gen)
    h = h[:, ::2] if h_strided else h
    w = torch.randn(V, H, generator=gen) / H**0.5 * 2.0
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.2] = IGNORE
    weights = torch.rand(N, generator=gen) * 2.0 - 0.5
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), targets.to(DEVICE), weights.to(DEVICE)


def _qkv(B, Sq, Sk, H, D, dtype, seed=0):
    """q [B, Sq, H, D]; k, v [B, Sk, H, D] as strided views of one fused projection, as the model makes them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=gen).to(DEVICE, dtype)
    kv = torch.randn(B, Sk, 2 * H * D, generator=gen).to(DEVICE, dtype)
    k, v = (t.view(B, Sk, H, D) for t in kv.chunk(2, dim=-1))
    do = torch.randn(B, Sq, H, D, generator=gen).to(DEVICE, dtype)
    return q, k, v, do


def _recording_backend(graphs):
    """aot_eager that keeps the forward and backward FX graphs AOTAutograd hands to the compilers."""

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _ops_in(graphs):
    return [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]


def _eager_and_compiled(fn, tensors, requires_grad, backend):
    """Run fn(*tensors) -> scalar and its backward, eager then torch.compile(fullgraph=True); (value, grads) each."""
    results = []
    for f in (fn, torch.compile(fn, backend=backend, fullgraph=True)):
        xs = [t.detach().clone().requires_grad_(rg) for t, rg in zip(tensors, requires_grad)]
        out = f(*xs)
        out.backward()
        results.append((out.detach(), [x.grad for x, rg in zip(xs, requires_grad) if rg]))
    return results


def _assert_identical(eager, compiled):
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    print("value eager", out_e.item(), "compiled", out_c.item())
    assert torch.equal(out_e, out_c)
    for i, (a, b) in enumerate(zip(grads_e, grads_c, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"grad {i}"


# --------------------------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake implementations, AOT dispatch with dynamic shapes
# --------------------------------------------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("dtype,h_strided,vocab_chunk", [(torch.float32, False, None), (torch.float16, True, 32)],
                         ids=["fp32_contig", "fp16_strided_chunked"])
def test_opcheck_fused_lce(dtype, h_strided, vocab_chunk):
    h, w, targets, _ = _lce_problem(N=21, H=24, V=70, dtype=dtype, h_strided=h_strided)  # opcheck runs it ~10x
    # Forward op with grad-requiring inputs, so test_aot_dispatch_dynamic also runs the registered backward.
    torch.library.opcheck(OPS.fused_lce_fwd.default,
                          (h.requires_grad_(), w.requires_grad_(), targets, IGNORE, vocab_chunk))
    _, lse = OPS.fused_lce_fwd(h.detach(), w.detach(), targets, IGNORE, vocab_chunk)
    dloss = torch.randn(h.shape[0], device=DEVICE)
    for need_dh, need_dw in ((True, True), (True, False), (False, True)):  # an unneeded grad comes back empty
        torch.library.opcheck(OPS.fused_lce_bwd.default,
                              (dloss, h.detach(), w.detach(), targets, lse, IGNORE, vocab_chunk, need_dh, need_dw))


@in_process
@pytest.mark.parametrize("Sq,Sk,causal,dtype", [(17, 17, True, torch.float32), (5, 40, True, torch.float16),
                                                (7, 23, False, torch.float32)])
def test_opcheck_flash_attn(Sq, Sk, causal, dtype):
    q, k, v, do = _qkv(1, Sq, Sk, 2, 32, dtype)
    scale = 32**-0.5
    torch.library.opcheck(OPS.flash_attn_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, scale, None, None))
    o, lse = OPS.flash_attn_fwd(q.detach(), k.detach(), v.detach(), causal, scale, 16, 16)
    torch.library.opcheck(OPS.flash_attn_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, causal, scale, 16, 16))


# --------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with aot_eager: no graph break, ops visible in the graphs, bit-identical to eager
# --------------------------------------------------------------------------------------------------------------


@in_process
@pytest.mark.parametrize("dtype,h_strided,vocab_chunk", [(torch.float32, False, None), (torch.float16, True, 64)],
                         ids=["fp32_contig", "fp16_strided_chunked"])
def test_compile_fused_linear_cross_entropy(dtype, h_strided, vocab_chunk):
    h, w, targets, weights = _lce_problem(dtype=dtype, h_strided=h_strided, seed=1)

    def fn(h, w):
        loss = flce.fused_linear_cross_entropy(h, w, targets, IGNORE, vocab_chunk=vocab_chunk)  # [N] fp32
        return (loss * weights).sum() / (targets != IGNORE).sum()

    graphs = []
    eager, compiled = _eager_and_compiled(fn, (h, w), (True, True), _recording_backend(graphs))
    _assert_identical(eager, compiled)
    fw_ops, bw_ops = _ops_in(graphs)
    assert "t2i.fused_lce_fwd.default" in fw_ops and "t2i.fused_lce_bwd.default" in bw_ops, (fw_ops, bw_ops)


@in_process
def test_compile_fused_lce_frozen_weight():
    # Only h needs a gradient (a frozen LM head): the backward op skips dw and autograd gets None for it.
    h, w, targets, weights = _lce_problem(seed=2)

    def fn(h, w):
        return (flce.fused_linear_cross_entropy(h, w, targets, IGNORE) * weights).sum()

    eager, compiled = _eager_and_compiled(fn, (h, w), (True, False), "aot_eager")
    _assert_identical(eager, compiled)


@in_process
def test_compile_lm_head_dispatch_triton():
    # The LM-head entry point the model calls: impl="triton" dispatches to the fused kernel inside the graph.
    h, w, targets, weights = _lce_problem(seed=3)

    def fn(h, w):
        return (linear_cross_entropy(h, w, targets, IGNORE, impl="triton") * weights).sum()

    eager, compiled = _eager_and_compiled(fn, (h, w), (True, True), "aot_eager")
    _assert_identical(eager, compiled)


@in_process
@pytest.mark.parametrize("Sq,Sk,causal,dtype", [(33, 33, True, torch.float32), (5, 40, True, torch.float16),
                                                (7, 23, False, torch.float16)])
def test_compile_flash_attention(Sq, Sk, causal, dtype):
    q, k, v, do = _qkv(2, Sq, Sk, 2, 32, dtype, seed=4)

    def fn(q, k, v):
        return (flash_attention(q, k, v, causal).float() * do.float()).sum()

    graphs = []
    eager, compiled = _eager_and_compiled(fn, (q, k, v), (True, True, True), _recording_backend(graphs))
    _assert_identical(eager, compiled)
    fw_ops, bw_ops = _ops_in(graphs)
    assert "t2i.flash_attn_fwd.default" in fw_ops and "t2i.flash_attn_bwd.default" in bw_ops, (fw_ops, bw_ops)


@in_process
def test_compile_dynamic_shapes_no_recompile():
    # Symbolic N and S go through the fake implementations: other lengths reuse the one dynamic graph. Sizes are
    # all distinct (duck sizing ties no two dimensions together) and inputs are fresh contiguous tensors (no
    # stride or view-base guards), so a second frame would mean an op or a check specialised on a length.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    h, w, targets, _ = _lce_problem(N=37, seed=5)                         # H = 40, V = 150
    q, k, v, _ = _qkv(2, 33, 33, 2, 32, torch.float32, seed=5)

    def fn(h, w, t, q, k, v):
        return flce.fused_linear_cross_entropy(h, w, t, IGNORE).sum() + flash_attention(q, k, v, True).sum()

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for n, s in ((37, 33), (29, 19)):
        args = [x.detach().clone().requires_grad_() for x in (h[:n], w)] + [targets[:n].clone()]
        args += [x[:, :s].clone(memory_format=torch.contiguous_format).requires_grad_() for x in (q, k, v)]
        out = compiled(*args)
        out.backward()
        ref_args = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
        ref = fn(*ref_args)
        ref.backward()
        assert torch.equal(out, ref)
        for a, b in zip(args, ref_args):
            if a.is_floating_point():
                assert torch.equal(a.grad, b.grad)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


test_compile_in_interpreter_subprocess = rerun_in_interpreter(__file__)


# --------------------------------------------------------------------------------------------------------------
# GPU: inductor (the op is an extern call; the surrounding ops are generated code, so only close, not equal)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_inductor_fullgraph(dtype):
    h, w, targets, weights = _lce_problem(N=1000, H=256, V=5000, dtype=dtype, seed=6)
    q, k, v, do = _qkv(2, 300, 300, 4, 64, dtype, seed=6)

    def fn(h, w, q, k, v):
        lce = (flce.fused_linear_cross_entropy(h, w, targets, IGNORE) * weights).sum()
        return lce + (linear_cross_entropy(h, w, targets, IGNORE, impl="triton") * weights).sum() \
            + (flash_attention(q, k, v, True).float() * do.float()).sum()

    (out_e, grads_e), (out_c, grads_c) = _eager_and_compiled(fn, (h, w, q, k, v), (True,) * 5, "inductor")
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
