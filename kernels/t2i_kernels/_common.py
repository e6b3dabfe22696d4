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


# The compile gate (t2i_kernels.compile_check) runs the launchers on meta tensors, which then stand for tensors on
# a GPU of this (multiprocessors, compute capability): kernels are compiled for it, never run. None outside the gate.
_AOT_GPU: tuple[int, int] | None = None


def set_aot_gpu(multiprocessors: int, capability: int) -> None:
    """compile_check only: treat meta tensors as tensors on a GPU with ``multiprocessors`` SMs and compute
    capability ``capability`` (80 for sm_80, 90 for sm_90a)."""
    global _AOT_GPU
    _AOT_GPU = (int(multiprocessors), int(capability))


def compiled_for_gpu(device: torch.device) -> bool:
    """True when kernels launched on ``device`` are compiled for a GPU (CUDA, or meta in the compile gate) rather
    than run by the interpreter on CPU tensors: the launchers pick GPU block sizes and grids then."""
    return device.type == "cuda" or (device.type == "meta" and _AOT_GPU is not None)


def multiprocessor_count(device: torch.device) -> int:
    """SMs of the GPU behind ``device`` (the compile gate's reference GPU for meta tensors)."""
    if device.type == "meta" and _AOT_GPU is not None:
        return _AOT_GPU[0]
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_capability(device: torch.device) -> int:
    """Compute capability as one number (80 = A100, 90 = H100/H200) of the GPU behind ``device``."""
    if device.type == "meta" and _AOT_GPU is not None:
        return _AOT_GPU[1]
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
