"""The preamble the kernel test modules share (test_fused_ce, test_ce_sum, test_compile).

The Triton interpreter is chosen when triton.jit decorates a kernel, i.e. when triton is first imported:
tests/conftest.py sets TRITON_INTERPRET=1 (without CUDA) before any test module imports it. If something imported
triton earlier, the kernels cannot run in this process: the tests marked `in_process` are skipped here and re-run
in a fresh process by the module's `test_*_in_interpreter_subprocess` (`rerun_in_interpreter`), never silently
dropped. torch.cuda.is_available() creates no CUDA context.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_kernels._common import interpreting

HAS_CUDA = torch.cuda.is_available()
KERNELS_IN_PROCESS = HAS_CUDA or interpreting()
in_process = pytest.mark.skipif(not KERNELS_IN_PROCESS,
                                reason="triton imported without TRITON_INTERPRET; run by the subprocess test")

DEVICE = "cuda" if HAS_CUDA else "cpu"
IGNORE = -100
# Tiny vocabulary with the paper's layout: text [0, T), image [T, T + I), specials [T + I, V).
T_TEXT, N_IMAGE, N_SPECIAL = 300, 64, 6
V_SMALL = T_TEXT + N_IMAGE + N_SPECIAL                    # 370: not a multiple of any block size
BOUNDARIES = (T_TEXT, T_TEXT + N_IMAGE)
# Interpreter-friendly dtypes on CPU (its bf16 tl.dot is wrong); bf16 joins when the kernels compile for a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def rerun_in_interpreter(test_file: str):
    """A test that re-runs `test_file`'s tests in a fresh process where TRITON_INTERPRET=1 precedes the triton
    import; None when they run in this process. Assign it to a module-level `test_*` name."""
    if KERNELS_IN_PROCESS:
        return None

    def test():
        env = dict(os.environ)  # conftest set TRITON_INTERPRET=1 on this CPU machine
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "not subprocess"]
        proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=600)
        print(proc.stdout[-6000:], proc.stderr[-3000:])
        assert proc.returncode == 0, f"{Path(test_file).name}'s tests failed in the interpreter subprocess"

    test.__doc__ = f"{Path(test_file).name}'s in_process tests, re-run where the interpreter precedes triton."
    return test
