"""What every Triton kernel file shares: whether kernels run in the interpreter, and the dot precision.

Imported only by kernel files (it imports triton).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

# triton.jit picks the interpreter at decoration time, for our kernels and for triton.language's own jit helpers
# such as tl.sum (decorated at the first triton import). TRITON_INTERPRET=1 set after triton was imported leaves
# those compiled-only and the interpreter cannot run them, so both conditions must hold.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and not isinstance(tl.sum, JITFunction)


@torch.compiler.assume_constant_result  # a process-wide constant: torch.compile reads it once, never traces it
def interpreting() -> bool:
    """True when kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 before `import triton`)."""
    return _INTERPRETED


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 inputs get exact fp32 products ("ieee", torch's default has TF32 off);
    16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def require_device(t: torch.Tensor, op: str) -> None:
    """Refuse CPU tensors unless the interpreter runs the kernels (a compiled kernel would read host memory)."""
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{op}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
                           "first imported to run them on the CPU")
