"""C++/CUDA ops of t2i_ds (imported as `t2i_csrc`), built on first use, and their nvcc compile gate.

One op so far, `torch.ops.t2i.cfg_sample` (cfg_sample.cpp: checks, CPU kernel, schema; cfg_sample.cu: CUDA kernel;
cfg_sample.h: the arithmetic both share). Its pure-torch reference and dispatcher are
`t2i_kernels.cfg_sample` (`cfg_sample_ref`, `cfg_sample`); they give the same codes bit for bit.

`load()` builds the extension with `torch.utils.cpp_extension.load` the first time a process asks for it and
caches the shared library under $TORCH_EXTENSIONS_DIR (default: `<venv>/torch_extensions` inside a virtual
environment, so environments never share or lock each other's builds); torch rebuilds when a source or a flag
changes. The CUDA kernel is compiled in only when torch has CUDA and a CUDA toolkit is found. Without a C++
compiler `load()` raises `CsrcBuildError` with one line saying so; `t2i_kernels.cfg_sample` then falls back to
the reference (same codes, slower).

`compile_cuda(arch)` compiles cfg_sample.cu alone with nvcc (no GPU and no CUDA torch needed: the .cu file
includes no torch header) and returns its registers, spills and shared memory per kernel, for the compile gate.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = ("cfg_sample.cpp",)
CUDA_SOURCES = ("cfg_sample.cu",)
HEADERS = ("cfg_sample.h", "cfg_sample_cuda.h")
OPS = ("t2i::cfg_sample",)
# No FMA contraction anywhere: every double operation rounds as the torch reference's does (cfg_sample.h).
# -O2: as fast as -O3 for this code and a shorter build.
CXX_FLAGS = ["-O2", "-ffp-contract=off", "-std=c++17"]
NVCC_FLAGS = ["-O2", "--fmad=false", "-std=c++17"]
ARCHS = ("sm_80", "sm_90a")  # A100, H100 (sm_90a: the arch-specific H100 target Triton compiles for too)


class CsrcBuildError(RuntimeError):
    """The C++ extension cannot be built here (no compiler, or the build failed); the message is one line."""


def sources() -> list[Path]:
    """Every source and header file of the extension (they ship as package data)."""
    return [SOURCE_DIR / name for name in (*CPU_SOURCES, *CUDA_SOURCES, *HEADERS)]


def build_root() -> Path:
    """$TORCH_EXTENSIONS_DIR, or `<venv>/torch_extensions` in a virtual environment, else torch's default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "torch_extensions"
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("t2i_csrc", verbose=False)).parent


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _with_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False) -> None:
    """Build (first call, cached on disk) and load the ops into this process; registers the fake kernels."""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    cxx = _compiler()
    if cxx is None:
        raise CsrcBuildError(
            "t2i_csrc: no C++ compiler found (c++, g++ or clang++ on PATH, or $CXX): install one (e.g. "
            "`apt-get install g++`) to build the sampling op; t2i_kernels.cfg_sample falls back to its "
            "pure-torch reference meanwhile")
    cuda = _with_cuda()
    files = [SOURCE_DIR / s for s in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    name = "t2i_csrc_cuda" if cuda else "t2i_csrc_cpu"
    build = build_root() / name
    build.mkdir(parents=True, exist_ok=True)
    defines = ["-DT2I_WITH_CUDA"] if cuda else []
    env_cxx = os.environ.get("CXX")
    os.environ.setdefault("CXX", cxx)  # torch's builder reads $CXX (default `c++`, which may be missing)
    try:
        cpp_load(name=name, sources=[str(f) for f in files], extra_cflags=CXX_FLAGS + defines,
                 extra_cuda_cflags=NVCC_FLAGS + defines, extra_include_paths=[str(SOURCE_DIR)],
                 build_directory=str(build), is_python_module=False, verbose=verbose)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        first = next((line for line in str(e).splitlines() if "error" in line.lower()), str(e).splitlines()[0] if str(e) else "")
        raise CsrcBuildError(f"t2i_csrc: building {name} in {build} failed: {first.strip()} "
                             f"(rerun t2i_csrc.load(verbose=True) for the compiler output)") from e
    finally:
        if env_cxx is None:
            os.environ.pop("CXX", None)
    _register_fakes(torch)


def _register_fakes(torch) -> None:
    """Shape-only kernels so torch.compile (fake tensors) traces through the op without running it."""

    @torch.library.register_fake("t2i::cfg_sample")
    def _cfg_sample_fake(logits, keys, step, image_start, image_end, cfg_scale, temperature, top_k):
        torch._check(logits.dim() == 2 and keys.dim() == 2)
        return keys.new_empty((keys.shape[0],))  # (b,) int64


def available() -> bool:
    """True when the ops are loaded or can be built now (builds them)."""
    try:
        load()
    except CsrcBuildError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# The nvcc compile gate: CUDA code must compile for the GPUs we run on, with a register and spill budget
# ----------------------------------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    """nvcc on PATH, under $CUDA_HOME, or in /usr/local/cuda*."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *sorted(Path("/usr/local").glob("cuda*"), reverse=True)]
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump next to nvcc, on PATH, or the one Triton ships (triton/backends/nvidia/bin)."""
    candidates = [Path(nvcc).parent / "cuobjdump"] if nvcc else []
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def _gencode(arch: str) -> str:
    m = re.fullmatch(r"(?:sm_)?(\d+a?)", arch)
    if not m:
        raise ValueError(f"arch {arch!r} is not like 'sm_80' or 'sm_90a'")
    return f"arch=compute_{m.group(1)},code=sm_{m.group(1)}"


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else "unknown"


def compile_cuda(arch: str, nvcc: str | None = None) -> dict:
    """Compile cfg_sample.cu for one arch with `nvcc -c` (no GPU needed); resource usage of every kernel.

    Returns {"op", "source", "arch", "nvcc", "seconds", "kernels": [{"name", "registers", "spill_stores",
    "spill_loads", "stack", "shared", "local"}]}: registers, stack, shared and local bytes from
    `cuobjdump --dump-resource-usage`, spill bytes from ptxas' own report (`-Xptxas -v`; cuobjdump has none).
    Raises FileNotFoundError when nvcc is missing, CsrcBuildError when the compile fails.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda*)")
    cuobjdump = find_cuobjdump(nvcc)
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (next to nvcc, on PATH, or in triton/backends/nvidia/bin)")
    source = SOURCE_DIR / CUDA_SOURCES[0]
    with tempfile.TemporaryDirectory(prefix="t2i_csrc_") as tmp:
        obj = Path(tmp) / "cfg_sample.o"
        cmd = [nvcc, "-c", *NVCC_FLAGS, "-Xptxas", "-v", "-gencode", _gencode(arch), "-I", str(SOURCE_DIR),
               str(source), "-o", str(obj)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if r.returncode != 0:
            errors = [line for line in r.stderr.splitlines() if "error" in line] or r.stderr.splitlines()[-1:]
            raise CsrcBuildError(f"nvcc {arch} failed: {errors[0].strip() if errors else r.returncode}")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], capture_output=True, text=True,
                               check=True).stdout
    kernels = _parse_resource_usage(usage)
    spills = _parse_ptxas_spills(r.stderr)
    for k in kernels:
        k.update(spills.get(k["name"], {"spill_stores": None, "spill_loads": None}))
    return {"op": OPS[0], "source": str(source), "arch": arch, "nvcc": _nvcc_version(nvcc),
            "seconds": round(seconds, 2), "kernels": kernels}


def _parse_resource_usage(text: str) -> list[dict]:
    kernels = []
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text):
        kernels.append({"name": m.group(1), "registers": int(m.group(2)), "stack": int(m.group(3)),
                        "shared": int(m.group(4)), "local": int(m.group(5))})
    if not kernels:
        raise CsrcBuildError("cuobjdump reported no kernels")
    return kernels


def _parse_ptxas_spills(text: str) -> dict[str, dict]:
    """ptxas -v: "Compiling entry function 'NAME' ..." then "N bytes spill stores, M bytes spill loads"."""
    found, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            found[name] = {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))}
            name = None
    return found
