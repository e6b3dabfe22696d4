"""Compile gate: every GPU kernel variant, compiled ahead of time for A100 (sm_80) and H100/H200 (sm_90a) on a
machine without a GPU, with its register, spill, shared-memory and tensor-core budget checked.

    python -m t2i_kernels.compile_check --arch sm_80,sm_90a [--json out.json] [--table out.md] [--jobs 2]

How: each *launch site* (an ``Entry``) runs the project's real launchers (the functions that call
``kernel[grid](...)``) on meta tensors at the real shapes and dtypes. ``JITFunction.run`` is intercepted: a launch
becomes ``warmup=True`` (compile, never run) against a stand-in driver that reports the target GPU, with pointer
alignment taken from each tensor's storage offset. So the variants compiled are exactly the ones the code
launches (block sizes, warps, stages, constexprs and integer specialisations chosen by the launchers themselves),
deduplicated by Triton's own cache key. Each cubin is then read with ``cuobjdump`` (shipped with Triton):
registers, stack (spill) bytes, static shared memory, and the SASS for MMA instructions and spills in loops.

A variant FAILS when it
  * does not compile;
  * needs more shared memory per block than the GPU has (A100 163 KiB, H100 227 KiB; dynamic + static);
  * spills inside a loop (a local-memory load/store between a backward branch and its target);
  * multiplies 16-bit matrices (``tt.dot`` on bf16/fp16 operands) without a tensor-core instruction of its
    architecture (HGMMA, the warpgroup MMA, on sm_90a; HMMA on sm_80). fp32 dots with ``ieee`` precision run on
    the FMA units by design (fp32 tests) and are exempt.
Spills outside loops are reported, not failed.

C++/CUDA ops (csrc/) join as ``NvccEntry`` items: a .cu file compiled to a cubin with ``nvcc -arch=<arch>``, then
the same analysis per kernel function. Add one to ``nvcc_entries()``.

Writes a JSON report (``--json``) and a markdown table (``--table``; the copy in benchmarks/README_compile.md is
the committed data). Exit status 0 when every variant passes, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # The gate compiles; it never interprets: set before the first `import triton` (python -m runs this first; the
    # spawned workers inherit it). Importing this module elsewhere changes nothing.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

KiB = 1024


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str              # "sm_80", "sm_90a"
    capability: int        # Triton GPUTarget arch (90 compiles for sm_90a)
    gpu: str
    smem_per_block: int    # bytes, opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    multiprocessors: int   # SMs of the reference GPU (launchers size some grids with it)
    mma: str               # tensor-core instruction a 16-bit matmul must use here


ARCHS = {
    "sm_80": Arch("sm_80", 80, "A100", 163 * KiB, 108, "HMMA"),
    "sm_90a": Arch("sm_90a", 90, "H100/H200", 227 * KiB, 132, "HGMMA"),
}


# ----------------------------------------------------------------------------------------------------------------
# Launch sites: the real launchers on meta tensors at the real shapes
# ----------------------------------------------------------------------------------------------------------------

# open_lm-1b extended: N = 1,152 x 8 tokens, H = 2,048, V = 66,822; attention B = 8, S = 1,152, 16 heads, D = 128;
# the elementwise kernels at the benchmark's 16 x 1,152 tokens (dim 2,048, FFN hidden 5,632).
SEQ, B, HIDDEN, VOCAB, HEADS, HEAD_DIM, FFN = 1152, 8, 2048, 66822, 16, 128, 5632
N_TOKENS = SEQ * B
IGNORE = -100


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _fused_ce_per_token(dtype):
    def run():
        from t2i_kernels import fused_linear_ce as f

        cfg = f._config_for(dtype)
        for b in (1, 8, 16):  # the benchmark's batch sizes: the backward's vocabulary chunk depends on N
            N = SEQ * b
            h, w, t = _meta(N, HIDDEN, dtype=dtype), _meta(VOCAB, HIDDEN, dtype=dtype), _meta(N, dtype=torch.int64)
            loss, lse = f._lce_forward(h, w, t, IGNORE, cfg)
            f._lce_backward(h, w, t, lse, loss, IGNORE, None, True, True, cfg)
            f._lce_backward(h, w, t, lse, loss, IGNORE, None, True, False, cfg)  # frozen output layer
    return run


def _fused_ce_sum(dtype):
    def run():
        from t2i_kernels.ce_grad_pass import launch_ce_grad_pass
        from t2i_kernels.ce_sum import default_chunk_tokens

        C = default_chunk_tokens(N_TOKENS, VOCAB, torch.finfo(dtype).bits // 8)
        z, t = _meta(C, VOCAB, dtype=dtype), _meta(C, dtype=torch.int64)
        launch_ce_grad_pass(z, t, IGNORE, True)    # training
        launch_ce_grad_pass(z, t, IGNORE, False)   # evaluation / probes (no_grad)
    return run


def _flash_attention(dtype, train=True, decode=False, probe=False):
    def run():
        from t2i_kernels import flash_attn as fa

        def fwd_bwd(b, sq, sk, heads, d, backward):
            q = _meta(b, sq, heads, d, dtype=dtype)
            k = _meta(b, sk, heads, d, dtype=dtype)
            o, lse = fa._flash_attn_forward(q, k, k, True, d**-0.5)
            if backward:
                fa._flash_attn_backward(o, q, k, k, o, lse, True, d**-0.5)

        if train:     # training and the attention benchmark: causal, Sq = Sk = 1,152
            fwd_bwd(B, SEQ, SEQ, HEADS, HEAD_DIM, True)
        if decode:    # generation with a KV cache: a prompt, then one query per step over a growing cache
            fwd_bwd(B, 130, 130, HEADS, HEAD_DIM, False)
            fwd_bwd(B, 1, SEQ, HEADS, HEAD_DIM, False)
            fwd_bwd(B, 1, SEQ - 1, HEADS, HEAD_DIM, False)
        if probe:     # the attention dispatcher's availability probe: [1, 128, 2, 64]
            fwd_bwd(1, 128, 128, 2, 64, False)
    return run


def _elementwise(dtype):
    def run():
        from t2i_kernels.layer_norm import LayerNormFunc
        from t2i_kernels.rotary import _launch as rotary_launch
        from t2i_kernels.swiglu import SwiGLUFunc

        M = 16 * SEQ
        x = _meta(M, HIDDEN, dtype=dtype).requires_grad_()
        y = LayerNormFunc.apply(x, _meta(HIDDEN, dtype=dtype), _meta(HIDDEN, dtype=dtype), 1e-5)
        y.backward(torch.empty_like(y))
        q = _meta(16, SEQ, HEADS, HEAD_DIM, dtype=dtype)
        cos = _meta(SEQ, HEAD_DIM // 2, dtype=torch.float32)
        rotary_launch(q, q, cos, cos, False)
        rotary_launch(q, q, cos, cos, True)
        x12 = _meta(M, 2 * FFN, dtype=dtype).requires_grad_()
        out = SwiGLUFunc.apply(x12)
        out.backward(torch.empty_like(out))
    return run


@dataclasses.dataclass(frozen=True)
class Entry:
    """A launch site: ``run()`` calls real launchers on meta tensors; every launch it makes is compiled."""

    name: str
    run: Callable[[], None]


def triton_entries() -> list[Entry]:
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        Entry("fused_ce_sum bf16 (training)", _fused_ce_sum(bf16)),
        Entry("fused_ce_sum fp32 (tests)", _fused_ce_sum(fp32)),
        Entry("fused_ce_per_token bf16 (benchmarks, scoring)", _fused_ce_per_token(bf16)),
        Entry("fused_ce_per_token fp32 (tests)", _fused_ce_per_token(fp32)),
        Entry("flash_attn bf16 (training, benchmarks)", _flash_attention(bf16, train=True)),
        Entry("flash_attn bf16 (generation, auto probe)", _flash_attention(bf16, train=False, decode=True,
                                                                          probe=True)),
        Entry("flash_attn fp32 (tests)", _flash_attention(fp32, train=True)),
        Entry("layer_norm/rotary/swiglu bf16 (benchmarks)", _elementwise(bf16)),
    ]


@dataclasses.dataclass(frozen=True)
class NvccEntry:
    """A CUDA source of csrc/ compiled with nvcc to a cubin for each arch; every kernel function in it is checked.

    ``dynamic_smem``: bytes of dynamic shared memory its launcher asks for (added to the static amount).
    ``matmul``: kernel function names (substrings of the mangled name) that must use tensor cores.
    """

    name: str
    source: Path
    flags: tuple[str, ...] = ("-O3", "-std=c++17")
    dynamic_smem: int = 0
    matmul: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


def nvcc_entries() -> list[NvccEntry]:
    """The CUDA sources of csrc/ (``t2i_csrc``), with the flags its builder compiles them with. A new .cu file
    listed in ``t2i_csrc.CUDA_SOURCES`` is gated without a change here."""
    try:
        import t2i_csrc
    except ImportError:  # an install without csrc/
        return []
    return [NvccEntry(f"csrc {name} (generation)", t2i_csrc.SOURCE_DIR / name, tuple(t2i_csrc.NVCC_FLAGS),
                      include=(str(t2i_csrc.SOURCE_DIR),)) for name in t2i_csrc.CUDA_SOURCES]


# ----------------------------------------------------------------------------------------------------------------
# Compiling a launch site for one arch: a stand-in driver and an intercepted JITFunction.run
# ----------------------------------------------------------------------------------------------------------------


class _TargetDriver:
    """What JITFunction.run asks the active driver for: the target, a device id (one per arch) and a stream."""

    def __init__(self, arch: Arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch.capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


def _mock(t: torch.Tensor):
    """A stand-in for a tensor argument: its dtype, and a device address as aligned as the real one would be
    (the caching allocator's blocks are 512-byte aligned; views add their storage offset)."""
    from triton.runtime.jit import MockTensor

    class _Arg(MockTensor):
        def __init__(self, t):
            super().__init__(t.dtype, list(t.shape))
            self._ptr = 512 + t.storage_offset() * t.element_size()

        def data_ptr(self):
            return self._ptr

    return _Arg(t)


def _config_key(fn, args, kwargs) -> tuple:
    """What decides a variant's code apart from integer specialisation: kernel, constexprs, warps, stages and the
    dtypes of its tensor arguments."""
    const = _constexprs(fn, args, kwargs)["constexprs"]
    dtypes = tuple(str(a.dtype) for a in args if hasattr(a, "_ptr"))
    return (fn.fn.__name__, json.dumps(const, sort_keys=True), kwargs.get("num_warps"), kwargs.get("num_stages"),
            dtypes)


def _compile_entry(entry: Entry, arch: Arch, seen: dict, every_specialisation: bool = False) -> list[dict]:
    """Run the launch site with every launch turned into a compile; one record per new variant.

    Variants that differ only in Triton's integer specialisation (an argument divisible by 16 or equal to 1, a
    pointer's alignment) are compiled once unless ``every_specialisation``: those change address arithmetic and
    vector widths, not tiles, shared memory or the MMA instructions.
    """
    from triton.runtime.jit import JITFunction

    records = []
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        args = [_mock(a) if isinstance(a, torch.Tensor) else a for a in args]
        config_key = None if every_specialisation else _config_key(self, args, kwargs)
        if config_key in seen:
            seen[config_key]["entries"] = sorted(set(seen[config_key]["entries"]) | {entry.name})
            return None
        t0 = time.perf_counter()
        try:
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result, recorded and failed
            rec = {"kernel": self.fn.__name__, "entry": entry.name, "entries": [entry.name], "arch": arch.name,
                   "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"}
            seen[config_key or ("error", self.fn.__name__, len(records))] = rec
            records.append(rec)
            return None
        if every_specialisation:
            key = (self.fn.__name__, kernel.hash)
            if key in seen:                   # the same variant from another launch: note the launch site only
                seen[key]["entries"] = sorted(set(seen[key]["entries"]) | {entry.name})
                return kernel
        rec = {"kernel": self.fn.__name__, "entry": entry.name, "entries": [entry.name], "arch": arch.name,
               "compile_s": round(time.perf_counter() - t0, 2),
               **_constexprs(self, args, kwargs), **_analyse_triton(kernel, arch)}
        seen[config_key or key] = rec
        records.append(rec)
        return kernel

    JITFunction.run = compile_only
    try:
        entry.run()
    except Exception as e:  # noqa: BLE001 - a launcher that fails before launching is a failed entry
        records.append({"kernel": "-", "entry": entry.name, "arch": arch.name,
                        "error": f"launcher: {type(e).__name__}: {str(e).strip()[:300]}"})
    finally:
        JITFunction.run = original
    return records


def _constexprs(fn, args, kwargs) -> dict:
    """Block sizes and flags of the variant (its constexpr arguments), warps and stages as launched."""
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    const = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
    first = next((a for a in args if hasattr(a, "_ptr")), None)                 # the first tensor: the operand
    return {"constexprs": {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in const.items()},
            "dtype": str(first.dtype).replace("torch.", "") if first is not None else "-"}


def _analyse_triton(kernel, arch: Arch) -> dict:
    md = kernel.metadata
    ttir = kernel.asm.get("ttir", "")
    fn_info = next(iter(analyse_cubin(kernel.asm["cubin"]).values()))          # a Triton cubin holds one kernel
    rec = {"warps": md.num_warps, "stages": md.num_stages, "dynamic_smem": md.shared,
           "mma_expected": _mma_expected(ttir), **fn_info}
    rec["shared"] = rec["dynamic_smem"] + rec["static_smem"]
    return rec


_DOT = re.compile(r"tt\.dot\b.*?:\s*tensor<[^>]*x(bf16|f16|f32|f8\w*)>\s*\*\s*tensor<[^>]*x(\w+)>")


def _mma_expected(ttir: str) -> bool:
    """True when the kernel multiplies 16-bit (or fp8, or tf32-precision fp32) matrices with tl.dot."""
    for line in ttir.splitlines():
        if "tt.dot" not in line:
            continue
        m = _DOT.search(line)
        if m and (m.group(1) != "f32" or "inputPrecision = tf32" in line):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# cubin analysis (Triton and nvcc alike)
# ----------------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    try:
        return getattr(triton.knobs.nvidia, name).path
    except Exception:  # noqa: BLE001 - older Triton: the binary beside the backend
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def analyse_cubin(cubin: bytes) -> dict[str, dict]:
    """Per kernel function: registers, stack/local (spill) bytes, static shared bytes, MMA counts and widest
    shape, spill instructions inside and outside loops."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        # One call prints both: the resource usage ("Function name:" lines), then the SASS ("Function : name").
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", "-sass", str(path)],
                              capture_output=True, text=True, check=True).stdout
    usage, sass = text, text
    out = {}
    for name, reg, stack, shared, local in _RES.findall(usage):
        out[name] = {"registers": int(reg), "stack_bytes": int(stack), "static_smem": int(shared),
                     "local_bytes": int(local)}
    for name, body in _split_sass(sass).items():
        if name in out:
            out[name].update(analyse_sass(body))
    return out


def _split_sass(sass: str) -> dict[str, str]:
    parts = re.split(r"\n\s*Function : (\S+)\s*\n", sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def analyse_sass(body: str) -> dict:
    """MMA counts and shapes; spill instructions (LDL/STL) and whether one sits inside a loop, a loop being the
    address range between a backward branch and its target."""
    instrs = [(int(a, 16), text.strip()) for a, text in _SASS_LINE.findall(body)]
    loops = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\S*\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    spills = [(addr, text) for addr, text in instrs if re.search(r"\b(LDL|STL)\b", text)]
    in_loop = [t for a, t in spills if any(lo <= a <= hi for lo, hi in loops)]
    hgmma = [t for _, t in instrs if re.search(r"\bHGMMA\.", t)]
    hmma = [t for _, t in instrs if re.search(r"\bHMMA\.", t)]
    shapes = sorted({m.group(1) for t in hgmma + hmma if (m := re.search(r"H?G?MMA\.(\w+)", t))}, key=_mma_width)
    return {"hgmma": len(hgmma), "hmma": len(hmma), "mma_shapes": shapes,
            "spill_instrs": len(spills), "spill_instrs_in_loops": len(in_loop), "loops": len(loops)}


def _mma_width(shape: str) -> int:
    """Output columns per instruction: HGMMA "64x128x16" -> 128; HMMA "16816" (m16n8k16) or "1688" -> 8."""
    return int(shape.split("x")[1]) if "x" in shape else 8


def _find_nvcc() -> str | None:
    try:
        from t2i_csrc import find_nvcc  # PATH, $CUDA_HOME, /usr/local/cuda*
    except ImportError:
        return shutil.which("nvcc")
    return find_nvcc()


def _short_names(mangled: list[str]) -> dict[str, str]:
    """Mangled C++ kernel names -> `cfg_sample_kernel<__half>` (c++filt when installed, else unchanged)."""
    filt = shutil.which("c++filt")
    if not filt or not mangled:
        return {m: m for m in mangled}
    out = subprocess.run([filt], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(mangled):
        return {m: m for m in mangled}
    def short(demangled: str) -> str:  # "void ns::(anonymous namespace)::k<__half>(args)" -> "k<__half>"
        head = demangled.replace("(anonymous namespace)", "_").split("(")[0]
        name, _, targs = head.partition("<")
        return name.rsplit("::", 1)[-1].split(" ")[-1] + (f"<{targs}" if targs else "")

    return {m: short(d) for m, d in zip(mangled, out)}


def _compile_nvcc(entry: NvccEntry, arch: Arch) -> list[dict]:
    nvcc = _find_nvcc()
    if nvcc is None:  # a machine without a CUDA toolkit: reported, not failed (the Triton kernels still are gated)
        return [{"kernel": "-", "entry": entry.name, "entries": [entry.name], "arch": arch.name,
                 "skipped": "nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda*)"}]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "out.cubin"
        t0 = time.perf_counter()
        includes = [f"-I{d}" for d in entry.include]
        proc = subprocess.run([nvcc, "-cubin", f"-arch={arch.name}", *entry.flags, *includes, "-o", str(cubin),
                               str(entry.source)], capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            return [{"kernel": "-", "entry": entry.name, "arch": arch.name,
                     "error": f"nvcc: {proc.stderr.strip()[-300:]}"}]
        info = analyse_cubin(cubin.read_bytes())
    names = _short_names(list(info))
    recs = []
    for fn, rec in info.items():
        rec = {"kernel": names[fn], "symbol": fn, "entry": entry.name, "entries": [entry.name], "arch": arch.name, "compile_s": seconds,
               "warps": None, "stages": None, "dynamic_smem": entry.dynamic_smem,
               "mma_expected": any(m in fn for m in entry.matmul), "constexprs": {}, "dtype": "-", **rec}
        rec["shared"] = rec["dynamic_smem"] + rec["static_smem"]
        recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------------------------
# Verdicts, worker, report
# ----------------------------------------------------------------------------------------------------------------


def verdict(rec: dict) -> list[str]:
    """Why a variant fails (empty: it passes)."""
    if rec.get("error"):
        return [f"does not compile: {rec['error']}"]
    if rec.get("skipped"):
        return []
    arch = ARCHS[rec["arch"]]
    why = []
    if rec["shared"] > arch.smem_per_block:
        why.append(f"shared memory {rec['shared'] / KiB:.0f} KiB > {arch.smem_per_block // KiB} KiB on {arch.gpu}")
    if rec["spill_instrs_in_loops"]:
        why.append(f"{rec['spill_instrs_in_loops']} spill instructions inside loops")
    if rec["mma_expected"] and not rec["hgmma" if arch.mma == "HGMMA" else "hmma"]:
        why.append(f"16-bit matmul without {arch.mma}")
    return why


def run_entries(arch_name: str, entries: list[Entry], cuda_entries: list[NvccEntry],
                every_specialisation: bool = False) -> list[dict]:
    """Compile the given launch sites and CUDA sources for one arch, in this process; records with verdicts."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from t2i_kernels import _common

    arch = ARCHS[arch_name]
    driver.set_active(_TargetDriver(arch))
    _common.set_aot_gpu(arch.multiprocessors, arch.capability)
    import t2i_kernels.flash_attn as fa

    if not isinstance(fa._fwd_kernel, JITFunction):
        raise RuntimeError("kernels were decorated for the interpreter (TRITON_INTERPRET=1 before this module)")
    records, seen = [], {}
    for entry in entries:
        records += _compile_entry(entry, arch, seen, every_specialisation)
    for entry in cuda_entries:
        records += _compile_nvcc(entry, arch)
    for rec in records:
        rec["failures"] = verdict(rec)
    return records


def _worker(arch_name: str, names: list[str] | None, cache_dir: str | None, every_specialisation: bool = False,
            ) -> list[dict]:
    """All selected launch sites for one arch (one process per arch)."""
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir

    def chosen(entries):
        return [e for e in entries if names is None or any(n in e.name for n in names)]

    return run_entries(arch_name, chosen(triton_entries()), chosen(nvcc_entries()), every_specialisation)


def markdown_table(records: list[dict]) -> str:
    lines = ["| kernel | arch | dtype | blocks (constexprs) | warps | stages | shared KiB | regs | spill B "
             "(in loops) | HGMMA | HMMA | widest MMA | compile s | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"], json.dumps(r.get("constexprs", {})))):
        if r.get("error") or r.get("skipped"):
            why = f"FAIL: {r['error']}" if r.get("error") else f"skipped: {r['skipped']}"
            lines.append(f"| {r['kernel']} | {r['arch']} | | {r['entry']} | | | | | | | | | | {why} |")
            continue
        blocks = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "GEMM", "V_PER"))
                           or v in (True, False))
        widest = r["mma_shapes"][-1] if r["mma_shapes"] else "-"
        spill = f"{r['stack_bytes']} ({r['spill_instrs_in_loops']})"
        v = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
        dash = lambda v: "-" if v is None else v  # noqa: E731 - nvcc kernels have no Triton warps/stages
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {blocks} | {dash(r['warps'])} | "
                     f"{dash(r['stages'])} | {r['shared'] / KiB:.1f} | {r['registers']} | {spill} | {r['hgmma']} | "
                     f"{r['hmma']} | {widest} | {r['compile_s']} | {v} |")
    return "\n".join(lines)


BEGIN, END = "<!-- compile-table:begin -->", "<!-- compile-table:end -->"


def update_readme(path: Path, table: str, report: dict) -> None:
    """Put the table (and how it was made) between the markers of a markdown file, keeping the rest."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    stamp = (f"Triton {report['triton']}, torch {report['torch']}, {', '.join(report['archs'])}: "
             f"{report['variants']} variants, {report['failed']} failed, {report['wall_s']:.0f} s wall "
             f"(cold cache, --jobs 2).")
    path.write_text(f"{head}{BEGIN}\n{stamp}\n\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_80,sm_90a", help=f"comma-separated, of {sorted(ARCHS)}")
    p.add_argument("--only", default=None, help="comma-separated substrings of launch-site names")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--table", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--readme", type=Path, default=None,
                   help="replace the table between the compile-table markers of this markdown file")
    p.add_argument("--jobs", type=int, default=2, help="processes (one arch each)")
    p.add_argument("--every-specialisation", action="store_true",
                   help="also compile variants that differ only in integer/alignment specialisation")
    p.add_argument("--cache-dir", default=None,
                   help="Triton cache for this run (default: a fresh temporary one, so compile seconds are cold)")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs or any(a not in ARCHS for a in archs):
        print(f"--arch must list some of {sorted(ARCHS)}, got {args.arch!r}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    with tempfile.TemporaryDirectory(prefix="t2i_compile_check_") as tmp:
        cache = args.cache_dir or tmp
        t0 = time.perf_counter()
        if args.jobs > 1 and len(archs) > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(archs)), mp_context=ctx) as pool:
                n = len(archs)
                results = list(pool.map(_worker, archs, [names] * n, [cache] * n, [args.every_specialisation] * n))
        else:
            results = [_worker(a, names, cache, args.every_specialisation) for a in archs]
        wall = time.perf_counter() - t0
    records = [r for rs in results for r in rs]
    failed = [r for r in records if r["failures"]]
    import triton

    report = {"triton": triton.__version__, "torch": torch.__version__, "archs": archs, "wall_s": round(wall, 1),
              "variants": len(records), "failed": len(failed), "records": records}
    table = markdown_table(records)
    print(table)
    print(f"\n{len(records)} variants for {', '.join(archs)} in {wall:.0f} s (Triton {triton.__version__}); "
          f"{len(failed)} failed", file=sys.stderr)
    for r in failed:
        print(f"FAIL {r['kernel']} [{r['arch']}] ({r['entry']}): {'; '.join(r['failures'])}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    if args.readme:
        update_readme(args.readme, table, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
