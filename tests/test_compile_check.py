"""The compile gate: every GPU kernel variant compiles for sm_80 and sm_90a on this CPU machine within its budget.

`make test` runs `python -m t2i_kernels.compile_check --arch sm_80,sm_90a` here (in a subprocess: the gate needs
Triton compiled, not interpreted) and requires it to pass. The Triton cache of these runs lives inside the virtual
environment, so a rerun only recompiles kernels whose source changed; a fresh clone (CI) compiles everything.
The analysis rules (spills inside loops, shared memory, tensor-core instructions) are tested on synthetic SASS and
records, and on a real kernel built to break the shared-memory budget.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(sys.prefix) / "triton-cache-compile-check"


def _env():
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def _kernels_in_repo() -> set[str]:
    """Every @triton.jit function named *_kernel in kernels/t2i_kernels/: what the gate must cover (helpers are inlined)."""
    names = set()
    for path in (REPO / "kernels" / "t2i_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "t2i_kernels.compile_check", "--arch", "sm_80,sm_90a", "--jobs", "2",
                           "--json", str(out), "--cache-dir", str(CACHE)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc.returncode, json.loads(out.read_text()) if out.exists() else None


def test_every_variant_passes_on_sm80_and_sm90a(report):
    rc, rep = report
    assert rep is not None, "the gate wrote no report"
    failed = [f"{r['kernel']} [{r['arch']}]: {r['failures']}" for r in rep["records"] if r["failures"]]
    assert rc == 0 and not failed, failed
    assert rep["archs"] == ["sm_80", "sm_90a"]


def test_every_kernel_is_covered_for_both_archs(report):
    _, rep = report
    expected = _kernels_in_repo()
    assert {"_lce_fwd_kernel", "_ce_grad_pass_kernel", "_bwd_dkdv_kernel", "_ln_fwd_kernel"} <= expected
    for arch in ("sm_80", "sm_90a"):
        got = {r["kernel"] for r in rep["records"] if r["arch"] == arch and not r["entry"].startswith("csrc ")}
        assert got == expected, f"{arch}: not compiled {expected - got}, unknown {got - expected}"
    # csrc's CUDA op, through nvcc, where a CUDA toolkit is installed (else reported as skipped, not failed)
    import t2i_csrc

    cuda = [r for r in rep["records"] if r["entry"].startswith("csrc ")]
    assert {r["arch"] for r in cuda} == {"sm_80", "sm_90a"}
    if t2i_csrc.find_nvcc() is None:
        assert all(r.get("skipped") for r in cuda)
    else:
        for arch in ("sm_80", "sm_90a"):
            names = {r["kernel"] for r in cuda if r["arch"] == arch}
            assert names == {"cfg_sample_kernel<float>", "cfg_sample_kernel<__half>",
                             "cfg_sample_kernel<__nv_bfloat16>"}, names
    dtypes = {(r["kernel"], r["dtype"]) for r in rep["records"]}
    for k in ("_ce_grad_pass_kernel", "_lce_fwd_kernel", "_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        assert {(k, "bfloat16"), (k, "float32")} <= dtypes, f"{k}: bf16 (training) and fp32 (tests) expected"


def test_matmul_kernels_use_the_widest_tensor_cores(report):
    _, rep = report
    for r in rep["records"]:
        if r["mma_expected"] and r["arch"] == "sm_90a":
            assert r["hgmma"] > 0 and r["hmma"] == 0, r
        if r["mma_expected"] and r["arch"] == "sm_80":
            assert r["hmma"] > 0, r
    # The retuned FlashAttention backward reaches 64x128 warpgroup MMAs on H100 (was 64x32 / 64x64).
    for k in ("_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        (r,) = [r for r in rep["records"] if r["kernel"] == k and r["arch"] == "sm_90a" and r["dtype"] == "bfloat16"]
        assert r["mma_shapes"][-1] == "64x128x16" and r["stack_bytes"] == 0, r


# ------------------------------------------------------------------------------------------------------------------
# the rules, on synthetic input (no compiler needed)
# ------------------------------------------------------------------------------------------------------------------

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   LDL R3, [R1+0x4] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""


def test_sass_analysis_finds_spills_inside_loops_and_mma_shapes():
    from t2i_kernels.compile_check import analyse_sass

    info = analyse_sass(SASS)
    assert info["loops"] == 1                                   # 0x40 -> 0x20; the self-branch at 0x70 is no loop
    assert info["spill_instrs"] == 2 and info["spill_instrs_in_loops"] == 1     # STL before the loop, LDL inside
    assert info["hgmma"] == 1 and info["hmma"] == 1
    assert info["mma_shapes"] == ["16816", "64x128x16"]
    assert analyse_sass(SASS.replace("@P0 BRA 0x20", "@P0 BRA 0x50"))["spill_instrs_in_loops"] == 0


def test_verdicts():
    from t2i_kernels.compile_check import _mma_expected, verdict

    ok = {"arch": "sm_90a", "shared": 200 * 1024, "spill_instrs_in_loops": 0, "mma_expected": True, "hgmma": 4,
          "hmma": 0}
    assert verdict(ok) == []
    assert "shared memory" in verdict({**ok, "arch": "sm_80", "hmma": 8})[0]          # 200 KiB > A100's 163 KiB
    assert "inside loops" in verdict({**ok, "spill_instrs_in_loops": 3})[0]
    assert "without HGMMA" in verdict({**ok, "hgmma": 0, "hmma": 16})[0]            # HMMA is not enough on H100
    assert verdict({**ok, "mma_expected": False, "hgmma": 0}) == []
    assert "does not compile" in verdict({"arch": "sm_80", "error": "boom"})[0]
    bf16 = "%5 = tt.dot %3, %4, %cst, inputPrecision = tf32 : tensor<64x32xbf16> * tensor<32x64xbf16> -> tensor<64x64xf32>"
    fp32 = "%5 = tt.dot %3, %4, %cst, inputPrecision = ieee : tensor<64x32xf32> * tensor<32x64xf32> -> tensor<64x64xf32>"
    assert _mma_expected(bf16) and not _mma_expected(fp32) and not _mma_expected("tt.load")


# ------------------------------------------------------------------------------------------------------------------
# a real kernel that breaks the budget fails; a csrc-style CUDA source goes through nvcc and the same rules
# ------------------------------------------------------------------------------------------------------------------

TOO_BIG = '''
import torch, triton, triton.language as tl

@triton.jit
def big_dot_kernel(A, B, C, BLOCK: tl.constexpr, K: tl.constexpr):
    r = tl.arange(0, BLOCK)
    k = tl.arange(0, K)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(0, 4096, K):
        a = tl.load(A + r[:, None] * 4096 + i + k[None, :])
        b = tl.load(B + (i + k[:, None]) * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + r[:, None] * BLOCK + r[None, :], acc)

def launch():
    a = torch.empty(256, 4096, device="meta", dtype=torch.bfloat16)
    b = torch.empty(4096, 256, device="meta", dtype=torch.bfloat16)
    c = torch.empty(256, 256, device="meta", dtype=torch.float32)
    big_dot_kernel[(1,)](a, b, c, BLOCK=256, K=128, num_warps=8, num_stages=4)
'''

CUDA = r'''
extern "C" __global__ void scale(float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
'''


def test_budget_breaking_kernel_fails_and_nvcc_entries(tmp_path):
    (tmp_path / "too_big.py").write_text(TOO_BIG)
    (tmp_path / "scale.cu").write_text(CUDA)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import t2i_kernels.compile_check as cc
        sys.path.insert(0, {str(tmp_path)!r})
        import too_big
        out = {{}}
        out["triton"] = cc.run_entries("sm_80", [cc.Entry("too big", too_big.launch)], [])
        if {shutil.which("nvcc") is not None}:
            src = Path({str(tmp_path / "scale.cu")!r})
            out["nvcc"] = cc.run_entries("sm_90a", [], [cc.NvccEntry("scale", src, dynamic_smem=240 * 1024)])
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (big,) = out["triton"]
    print(big)
    assert big["kernel"] == "big_dot_kernel" and big["shared"] > 163 * 1024
    assert any("shared memory" in f for f in big["failures"]), big
    if "nvcc" in out:  # parsed like a Triton cubin; 240 KiB of declared dynamic shared memory breaks the H100 budget
        (scale,) = out["nvcc"]
        assert scale["kernel"] == "scale" and 0 < scale["registers"] < 64 and scale["stack_bytes"] == 0, scale
        assert scale["hgmma"] == 0 and not scale["mma_expected"] and scale["failures"] == [
            f"shared memory 240 KiB > 227 KiB on H100/H200"], scale
