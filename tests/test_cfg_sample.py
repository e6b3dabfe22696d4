"""t2i::cfg_sample (csrc/, C++ CPU op) against its pure-torch reference (t2i_kernels.cfg_sample): the generator
(Philox known answers, Triton's Philox), bit-identical codes, invariance to batch and row order, the sampled
distribution (chi-square), greedy = argmax, torch.compile tracing, and the CUDA source through nvcc (sm_80, sm_90a).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

import t2i_csrc
from t2i_kernels import cfg_sample as cs
from t2i_kernels.cfg_sample import cfg_sample, cfg_sample_ref, gumbel_from_bits, log_portable, philox4x32_10

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def op():
    """The C++ op, built once per session (cached inside the venv across sessions)."""
    try:
        t2i_csrc.load()
    except t2i_csrc.CsrcBuildError as e:
        pytest.skip(str(e))
    return torch.ops.t2i.cfg_sample


def keys_for(captions, seed=0):
    captions = torch.as_tensor(captions, dtype=torch.int64)
    return torch.stack([torch.full_like(captions, seed), captions], dim=1)  # (b, 2)


def random_logits(rows, vocab, seed, scale=3.0, dtype=torch.float32):
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10 (curand and Triton implement the same function)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        assert tuple(int(w) for w in philox4x32_10(*ctr, *key)) == want


def test_philox_matches_triton():
    """Our int64 Philox against triton.language.philox (run by the interpreter on CPU) on random counters/keys."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET"):
        pytest.skip("no GPU and no Triton interpreter")

    @triton.jit
    def philox_kernel(C, OUT, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        c0, c1, c2, c3 = (tl.load(C + k * N + i) for k in range(4))
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        for k, r in enumerate((r0, r1, r2, r3)):
            tl.store(OUT + k * N + i, r)

    gen = torch.Generator().manual_seed(0)
    n, seed = 64, 0x1234_5678_9ABC_DEF0
    counters = torch.randint(0, 2**32, (4, n), generator=gen, dtype=torch.int64)
    out = torch.empty(4, n, dtype=torch.int32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c32 = counters.to(torch.uint32).view(torch.int32).to(device)  # the same 32 bits, as Triton's uint32
    out = out.to(device)
    philox_kernel[(1,)](c32, out, seed, N=n)
    got = out.cpu().to(torch.int64) & 0xFFFFFFFF  # (4, n) as unsigned
    ours = torch.stack(philox4x32_10(*counters, seed & 0xFFFFFFFF, seed >> 32))
    assert torch.equal(got, ours)


def test_log_portable_is_accurate():
    y = torch.cat([torch.logspace(-12, 2, 2001, dtype=torch.float64), torch.tensor([1.0, 0.5, 2.0, 1 - 2**-33])])
    want = torch.tensor([math.log(v) for v in y.tolist()], dtype=torch.float64)
    err = ((log_portable(y) - want).abs() / want.abs().clamp(min=1e-300)).max()
    print(f"log_portable: max relative error {err:.2e}")
    assert err < 4e-16 or (log_portable(y) - want).abs().max() < 1e-16
    bits = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = (bits.double() + 0.5) / 2**32
    torch.testing.assert_close(gumbel_from_bits(bits), -torch.log(-torch.log(u)), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Op == reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guided", [True, False])
def test_op_equals_reference(op, dtype, guided):
    b, vocab, start, end = 9, 203, 11, 190  # 179 image columns: not a multiple of 4
    logits = random_logits(2 * b if guided else b, vocab, seed=1, dtype=dtype)
    captions = [0, 1, 5, 2**31 + 7, 2**32 + 3, 2**40 + 1, 123456789, 42, 7]  # beyond 32 bits too
    keys = torch.stack([torch.tensor([0, 1, 2**33 + 5, 7, 7, 7, 9, 2**62, 3]), torch.tensor(captions)], dim=1)
    cfg = 2.5 if guided else 0.0
    checked = 0
    for top_k in (0, 1, 2, 7, 178, 179, 500):
        for temperature in (1.0, 0.37):
            for step in (0, 1, 1023, 2**32 - 1):
                step_t = torch.tensor(step)
                got = op(logits, keys, step_t, start, end, cfg, temperature, top_k)
                want = cfg_sample_ref(logits, keys, step_t, start, end, cfg, temperature, top_k)
                assert got.dtype == torch.int64 and got.shape == (b,)
                assert torch.equal(got, want), (top_k, temperature, step, got, want)
                checked += 1
    assert checked == 56


def test_op_equals_reference_with_ties_and_strided_rows(op):
    """Integer-valued logits (many exact ties, also at the top-k threshold) in a non-contiguous (sliced) view."""
    b = 16
    full = torch.randint(-3, 4, (2 * b, 300), generator=torch.Generator().manual_seed(2)).float()
    logits = full[:, 20:260]  # stride(0) = 300
    assert not logits.is_contiguous()
    keys = keys_for(range(b), seed=5)
    for top_k in (0, 1, 3, 40):
        for step in range(5):
            got = op(logits, keys, torch.tensor(step), 4, 200, 1.5, 0.8, top_k)
            want = cfg_sample_ref(logits, keys, torch.tensor(step), 4, 200, 1.5, 0.8, top_k)
            assert torch.equal(got, want)


def test_real_vocabulary_shape(op):
    """The paper's layout: 66,822 ids, image slice [50432, 66816), 8 captions with CFG, top-k 1000 and none."""
    b = 8
    logits = random_logits(2 * b, 66_822, seed=3)
    keys = keys_for(range(100, 100 + b), seed=11)
    for top_k in (0, 1000):
        got = op(logits, keys, torch.tensor(17), 50_432, 66_816, 3.0, 1.0, top_k)
        assert torch.equal(got, cfg_sample_ref(logits, keys, torch.tensor(17), 50_432, 66_816, 3.0, 1.0, top_k))
        assert ((got >= 0) & (got < 16_384)).all()


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility: a caption's codes do not depend on its batch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["op", "ref"])
def test_same_caption_same_codes_at_any_batch_size_and_row_order(op, impl):
    n, vocab = 64, 97
    cond, uncond = random_logits(n, vocab, seed=4), random_logits(n, vocab, seed=5)  # one row pair per caption
    captions = torch.arange(1000, 1000 + n)

    def sample(idx):
        idx = torch.as_tensor(idx)
        logits = torch.cat([cond[idx], uncond[idx]])  # (2b, V) [cond; uncond]
        return cfg_sample(logits, keys_for(captions[idx], seed=3), torch.tensor(9), 0, vocab, 2.0, 1.0, 0, impl=impl)

    everything = sample(range(n))  # batch 64
    assert len(everything.unique()) > 20  # really sampled, not a constant
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sample(perm), everything[perm])  # any row order
    for i in range(0, n, 7):
        assert sample([i]).item() == everything[i]  # batch 1
    for start in range(0, n - 3, 9):
        assert torch.equal(sample([start + 2, start, start + 1]), everything[[start + 2, start, start + 1]])  # batch 3


def test_seed_caption_and_step_select_independent_streams(op):
    n = 4096
    logits = random_logits(1, 64, seed=7)
    p = torch.softmax(logits[0].double(), 0)
    agree = float((p * p).sum())  # P(two independent draws are equal)
    draw = lambda seed, step: op(logits.repeat(n, 1), keys_for(range(n), seed), torch.tensor(step), 0, 64, 0.0, 1.0, 0)
    base = draw(0, 0)
    for other in (draw(1, 0), draw(0, 1)):  # another seed, another step: fresh draws for the same captions
        observed = float((other == base).double().mean())
        print(f"agreement {observed:.4f}, independent {agree:.4f}")
        assert abs(observed - agree) < 4 * math.sqrt(agree * (1 - agree) / n)


# ----------------------------------------------------------------------------------------------------------------
# The distribution
# ----------------------------------------------------------------------------------------------------------------


def test_frequencies_match_the_target_distribution(op):
    """Chi-square at a fixed seed: codes of 40,000 captions sharing one guided, tempered, top-k distribution."""
    stats = pytest.importorskip("scipy.stats")
    n, temperature, top_k, cfg = 40_000, 0.8, 6, 1.7
    cond = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0, 1.5, -2.0, 0.7, 0.2, 3.0]])
    uncond = torch.tensor([[0.0, 1.0, 0.5, 0.8, -0.5, 1.0, 0.0, 0.9, 0.0, 2.0]])
    m = (uncond + cfg * (cond - uncond)).double()[0]  # (10,)
    kept = m >= torch.topk(m, top_k).values[-1]
    p = torch.where(kept, torch.softmax(torch.where(kept, m / temperature, -math.inf), 0), 0)  # target
    logits = torch.cat([cond.repeat(n, 1), uncond.repeat(n, 1)])  # (2n, 10)
    for step in (0, 511):
        codes = op(logits, keys_for(range(n), seed=123), torch.tensor(step), 0, 10, cfg, temperature, top_k)
        counts = torch.bincount(codes, minlength=10).double()
        assert counts[~kept].sum() == 0  # never outside the top k
        chi2, pvalue = stats.chisquare(counts[kept].numpy(), (p[kept] * n).numpy())
        print(f"step {step}: chi2 {chi2:.2f} on {top_k - 1} dof, p = {pvalue:.3f}")
        assert pvalue > 1e-3


def test_top_k_1_is_the_argmax_of_the_guided_logits(op):
    b = 32
    logits = random_logits(2 * b, 500, seed=8)
    cfg = 4.0
    want = (logits[b:, 100:400].double() + cfg * (logits[:b, 100:400].double() - logits[b:, 100:400].double())).argmax(-1)
    for seed in (0, 99):
        assert torch.equal(op(logits, keys_for(range(b), seed), torch.tensor(3), 100, 400, cfg, 0.5, 1), want)
    assert torch.equal(cfg_sample_ref(logits, keys_for(range(b)), 3, 100, 400, cfg, 0.5, 1), want)


# ----------------------------------------------------------------------------------------------------------------
# Errors, dispatch, torch.compile
# ----------------------------------------------------------------------------------------------------------------


def test_input_checks(op):
    logits, keys, step = random_logits(4, 50, seed=9), keys_for(range(2)), torch.tensor(0)
    bad = [
        ((logits[:3], keys, step, 0, 50, 1.0, 1.0, 0), "b or 2b rows"),
        ((logits[:2], keys, step, 0, 50, 1.0, 1.0, 0), "needs 2b rows"),
        ((logits, keys, step, 10, 60, 1.0, 1.0, 0), "image range"),
        ((logits, keys, step, 0, 50, 1.0, 0.0, 0), "temperature must be > 0"),
        ((logits, keys, step, 0, 50, 1.0, 1.0, -1), "top_k must be >= 0"),
        ((logits, keys.int(), step, 0, 50, 1.0, 1.0, 0), "keys must be"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
        with pytest.raises(ValueError, match=message):
            cfg_sample_ref(*args)


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch):
    def no_build():
        raise t2i_csrc.CsrcBuildError("t2i_csrc: no C++ compiler found")

    monkeypatch.setattr(t2i_csrc, "load", no_build)
    monkeypatch.setattr(cs, "_OP_STATE", {})
    logits, keys = random_logits(6, 40, seed=10), keys_for(range(3))
    with pytest.warns(UserWarning, match=r"no C\+\+ compiler found.*pure-torch reference"):
        got = cfg_sample(logits, keys, torch.tensor(2), 0, 40, 2.0, 1.0, 5)
    assert torch.equal(got, cfg_sample_ref(logits, keys, 2, 0, 40, 2.0, 1.0, 5))


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(t2i_csrc, "_compiler", lambda: None)
    with pytest.raises(t2i_csrc.CsrcBuildError) as e:
        t2i_csrc.load.__wrapped__()  # bypass the per-process cache
    assert "\n" not in str(e.value) and "no C++ compiler" in str(e.value)


def test_torch_compile_traces_the_op(op):
    """The fake kernel lets dynamo/AOT trace the op into one graph (fullgraph: no break)."""

    def step_fn(logits, keys, step):
        mixed = logits * 1.0  # something for the graph around the op
        return torch.ops.t2i.cfg_sample(mixed, keys, step, 0, logits.shape[1], 2.0, 0.9, 5) + 1

    logits, keys, step = random_logits(8, 64, seed=11), keys_for(range(4)), torch.tensor(6)
    compiled = torch.compile(step_fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits, keys, step), step_fn(logits, keys, step))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.t2i.cfg_sample(torch.empty(8, 64), torch.empty(4, 2, dtype=torch.int64),
                                        torch.empty((), dtype=torch.int64), 0, 64, 2.0, 1.0, 0)
        assert fake.shape == (4,) and fake.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------
# Packaging and the CUDA compile gate
# ----------------------------------------------------------------------------------------------------------------


def test_sources_ship_as_package_data():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["t2i_csrc"] == "csrc" and "t2i_csrc" in cfg["packages"]
    globs = cfg["package-data"]["t2i_csrc"]
    for path in t2i_csrc.sources():
        assert path.is_file() and any(path.match(g) for g in globs), path


@pytest.mark.parametrize("arch", t2i_csrc.ARCHS)
def test_cuda_source_compiles(arch):
    """nvcc -c cfg_sample.cu for A100 and H100 (no GPU needed): no spills, no stack, registers within budget."""
    if t2i_csrc.find_nvcc() is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda*): the CUDA compile gate needs a CUDA toolkit")
    if t2i_csrc.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton/backends/nvidia/bin)")
    report = t2i_csrc.compile_cuda(arch)
    print(report)
    assert report["arch"] == arch and len(report["kernels"]) == 3  # float32, float16, bfloat16
    for k in report["kernels"]:
        assert "cfg_sample_kernel" in k["name"]
        # 256 threads a block: <= 128 registers keeps 2 blocks per SM; no spills to local memory
        assert 0 < k["registers"] <= 128 and k["spill_stores"] == 0 and k["spill_loads"] == 0
        assert k["stack"] == 0 and k["local"] == 0


@pytest.mark.requires_cuda
def test_cuda_op_equals_cpu(op):
    b = 8
    logits = random_logits(2 * b, 66_822, seed=12)
    keys = keys_for(range(b), seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        for top_k in (0, 1, 1000):
            cpu = op(logits.to(dtype), keys, torch.tensor(5), 50_432, 66_816, 3.0, 1.0, top_k)
            gpu = op(logits.to(dtype).cuda(), keys.cuda(), torch.tensor(5).cuda(), 50_432, 66_816, 3.0, 1.0, top_k)
            assert torch.equal(gpu.cpu(), cpu)
            ref = cfg_sample_ref(logits.to(dtype).cuda(), keys.cuda(), torch.tensor(5).cuda(), 50_432, 66_816, 3.0, 1.0, top_k)
            assert torch.equal(ref.cpu(), cpu)
