"""The one attention entry point of the model: `attention(q, k, v, causal=..., backend=...)` on [B, S, H, D].

Backends (all take and return open_lm's [B, S, H, D]; transposes happen here, never in the model):

    flash_attn      flash-attn's `flash_attn_func` (CUDA, fp16/bf16; optional dependency)
    sdpa            torch `F.scaled_dot_product_attention`; torch picks flash / cuDNN / mem-efficient / math
    sdpa_flash      SDPA forced onto one kernel with `torch.nn.attention.sdpa_kernel`
    sdpa_cudnn      "
    sdpa_efficient  "
    sdpa_math       "
    triton          this project's Triton FlashAttention (`t2i_kernels.flash_attn`)
    eager           explicit softmax in fp32 (`attention_ref`); a reference for tests, O(S^2) memory
    auto            CPU: sdpa. CUDA: the fastest backend by measurement, see below.

Semantics shared by every backend: softmax scale 1/sqrt(D); with Sq < Sk (decoding with a KV cache) the
queries are the LAST Sq positions, so the causal mask is aligned to the bottom-right corner: query i attends
keys j <= Sk - Sq + i. The result may be a non-contiguous view (SDPA returns [B, H, S, D] memory).

Key padding (`key_padding_mask` [B, Sk] bool, True = a real key; batched generation with left-padded
prompts): query i of row b attends key j iff

    causal(i, j) and (key_padding_mask[b, j] or j == Sk - Sq + i)

i.e. padded keys are never attended, except that a query always sees its own key. That exception only
matters for queries AT padded positions: without it their softmax row would be empty (NaN), the NaN would
reach the padded K/V of the next layer, and 0 * NaN = NaN would leak into the real rows through P @ V.
A real query's own key is real, so its output is exactly that of the unpadded row. Only SDPA and eager take
an explicit mask: with a mask, flash_attn / triton / sdpa_flash / sdpa_cudnn / auto run plain sdpa (torch
then picks mem-efficient or math), sdpa_efficient / sdpa_math keep their kernel, eager applies the mask in
fp32. With `key_padding_mask=None` every backend behaves exactly as without this feature.

"auto" on CUDA (measured, not guessed): the first call for a key
    (device, dtype, head_dim, causal, Sq bucket, Sk bucket)
with seq-len buckets = next power of two, times every available fast backend (all but eager and sdpa_math,
which materialise [Sq, Sk]) on the call's own shapes: 2 warm-up runs (JIT compilation happens there), then the
median of 5 CUDA-event-timed runs. Square calls (Sq == Sk: training, prefill) time forward + backward, whether
or not the call itself needs gradients, so that a forward under no_grad and its activation-checkpointing
recompute pick the same kernel; rectangular calls (Sq < Sk: decoding with a KV cache) time the forward only.
The winner is cached in-process (`auto_choices()` shows the table, `reset_auto_choices()` clears it); backends
that raise are skipped. The trial synchronises the device once per key, never again in the steady state. It is
not run while a CUDA graph is being captured or while torch.compile traces: there the cached choice, or plain
sdpa when none exists, is used. Ranks measure independently and may pick different kernels, and timing noise
may pick differently from run to run: pass an explicit backend for bitwise-reproducible runs.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("flash_attn", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "triton", "eager")
VALID_BACKENDS = ("auto",) + BACKENDS
_SLOW_BACKENDS = ("eager", "sdpa_math")  # materialise [B, H, Sq, Sk]; never candidates for "auto"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Backends: each maps [B, Sq, H, D] x [B, Sk, H, D] x [B, Sk, H, D] -> [B, Sq, H, D]
# --------------------------------------------------------------------------------------------------------------
def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, kernel=None) -> Tensor:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    Sq, Sk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal and Sq == Sk:
        is_causal = True
    elif causal and Sq > 1:  # KV cache prefill/chunk: SDPA's is_causal is top-left aligned, we need bottom-right
        mask = causal_lower_right(Sq, Sk)
    # causal with Sq == 1: the last query sees every key, i.e. no mask at all.
    ctx = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal
        )  # (B, H, Sq, D)
    return out.transpose(1, 2)  # (B, Sq, H, D), a view


def _sdpa_forced(name: str) -> Callable[[Tensor, Tensor, Tensor, bool], Tensor]:
    def run(q, k, v, causal):
        from torch.nn.attention import SDPBackend

        kernel = {
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_math": SDPBackend.MATH,
        }[name]
        return _sdpa(q, k, v, causal, kernel)

    return run


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from flash_attn import flash_attn_func  # optional dependency; bottom-right causal alignment since 2.1

    return flash_attn_func(q, k, v, causal=causal)


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from t2i_kernels.flash_attn import flash_attention

    return flash_attention(q, k, v, causal)


def _eager(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    # The kernels' own reference, so tests and "eager" share one unmasked baseline; attention_ref takes no
    # key-padding mask, so the masked path has its own fp32 reference, _eager_masked.
    from t2i_kernels.flash_attn import attention_ref

    return attention_ref(q, k, v, causal)


def padded_causal_mask(key_padding_mask: Tensor, Sq: int, causal: bool) -> Tensor:
    """[B, Sk] key padding (True = real) -> [B, 1, Sq, Sk] bool, True = attend (see the module docstring).

    causal: bottom-right aligned, and a query always sees its own key (no empty softmax row); non-causal:
    the padding mask broadcast over the queries (a row whose keys are all padded is then undefined).
    """
    B, Sk = key_padding_mask.shape
    keys = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
    if not causal:
        return keys.expand(B, 1, Sq, Sk)
    i = torch.arange(Sq, device=key_padding_mask.device)[:, None] + (Sk - Sq)  # (Sq, 1) absolute query position
    j = torch.arange(Sk, device=key_padding_mask.device)[None, :]  # (1, Sk)
    return (j <= i) & (keys | (j == i))  # (B, 1, Sq, Sk)


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, kernel=None) -> Tensor:
    """SDPA with an explicit [B, 1, Sq, Sk] boolean mask (True = attend)."""
    from torch.nn.attention import sdpa_kernel

    ctx = sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )  # (B, H, Sq, D)
    return out.transpose(1, 2)  # (B, Sq, H, D), a view


def _eager_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Explicit softmax in fp32 with a [B, 1, Sq, Sk] boolean mask: the reference of the masked path."""
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Sq, Sk)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, Sq, Sk)
    return (probs @ vh).transpose(1, 2).to(q.dtype)  # (B, Sq, H, D)


def _masked(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor, backend: str) -> Tensor:
    """The key-padding path: SDPA with an explicit mask, or eager; backends without mask support use sdpa."""
    from torch.nn.attention import SDPBackend

    mask = padded_causal_mask(key_padding_mask, q.shape[1], causal)  # (B, 1, Sq, Sk)
    if backend == "eager":
        return _eager_masked(q, k, v, mask)
    kernel = {"sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}.get(backend)
    return _sdpa_masked(q, k, v, mask, kernel)


# --------------------------------------------------------------------------------------------------------------
# Decoding on the CPU: one query per row over a KV cache, explicit softmax (no SDPA)
# --------------------------------------------------------------------------------------------------------------
def use_decode_attention(x: Tensor, backend: str) -> bool:
    """Whether a one-token decode step takes `decode_attention`: on the CPU, with a backend that leaves the kernel
    choice to this module (auto, sdpa). Measured (benchmarks/README.md, against the peers): SDPA's CPU kernel under a
    key-padding mask spent ~650 us per call on one query over <= 80 keys (demo model, 64 rows, 4 heads, head dim
    32), 36% of a batch-32 CFG decode; three batched GEMM/softmax ops do the same work in a fraction of it. GPUs keep
    SDPA (their fused kernels, bf16 softmax precision, CUDA graphs as captured today)."""
    return x.device.type == "cpu" and backend in ("auto", "sdpa")


def decode_attention_bias(key_padding_mask: Tensor, n_heads: int, dtype: torch.dtype, causal: bool) -> Tensor:
    """[B, n] key padding (True = a real key) -> [B * H, 1, n] additive bias: 0 = attend, -inf = padded.

    Made once per decode step and shared by every layer. causal: the query is the last column and always sees its
    own key (the module docstring's rule; the whole-cache static form passes False: its mask alone decides)."""
    B, n = key_padding_mask.shape
    bias = torch.zeros(B, 1, 1, n, dtype=dtype, device=key_padding_mask.device)
    bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))  # (B, 1, 1, n)
    if causal:
        bias[..., -1] = 0.0
    return bias.expand(B, n_heads, 1, n).reshape(B * n_heads, 1, n)  # (B * H, 1, n)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(q kᵀ / sqrt(D) + bias) v for one query: q [N, 1, D], k and v [N, n, D] (N = B * H, views of the
    cache), bias [N, 1, n] additive or None -> [N, 1, D]. The softmax in fp32 (what the masked path's reference,
    `_eager_masked`, computes); a 16-bit input's scores and output in its own dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if bias is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # (N, 1, n)
    else:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # (N, 1, n): scale and mask in one GEMM
    return torch.bmm(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)  # (N, 1, D)


_IMPLS: dict[str, Callable[[Tensor, Tensor, Tensor, bool], Tensor]] = {
    "flash_attn": _flash_attn,
    "sdpa": _sdpa,
    "sdpa_flash": _sdpa_forced("sdpa_flash"),
    "sdpa_cudnn": _sdpa_forced("sdpa_cudnn"),
    "sdpa_efficient": _sdpa_forced("sdpa_efficient"),
    "sdpa_math": _sdpa_forced("sdpa_math"),
    "triton": _triton,
    "eager": _eager,
}


# --------------------------------------------------------------------------------------------------------------
# Availability: probed by running each backend once on a tiny input on the device (cached per device)
# --------------------------------------------------------------------------------------------------------------
def _probe_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@lru_cache(maxsize=None)
def _available(device: torch.device) -> tuple[str, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, generator=gen).to(device, _probe_dtype(device)) for _ in range(3))
    found = []
    for name in BACKENDS:
        if name == "flash_attn" and device.type != "cuda":
            continue
        try:
            with torch.no_grad():
                _IMPLS[name](q, k, v, True)
        except Exception:  # ImportError, "No available kernel", Triton without CUDA or interpreter, ...
            continue
        found.append(name)
    return tuple(found)


def _as_device(device: torch.device | str | int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def available_backends(device: torch.device | str | int = "cpu") -> list[str]:
    """Concrete backends that run on `device` (a tiny causal probe per backend, cached per device).

    Availability can still depend on shape and dtype (e.g. flash kernels need 16-bit inputs on CUDA); the probe
    uses the device's preferred 16-bit dtype on CUDA, fp32 on CPU, head dim 64.
    """
    return list(_available(_as_device(device)))


# --------------------------------------------------------------------------------------------------------------
# "auto": one timed trial per key, cached in-process
# --------------------------------------------------------------------------------------------------------------
_AUTO_CHOICES: dict[tuple, str] = {}


def auto_choices() -> dict[tuple, str]:
    """The backends "auto" has chosen so far, keyed by (device, dtype, D, causal, Sq bucket, Sk bucket)."""
    return dict(_AUTO_CHOICES)


def reset_auto_choices() -> None:
    _AUTO_CHOICES.clear()


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # next power of two


def _time_backend(fn, q: Tensor, k: Tensor, v: Tensor, causal: bool, grad: bool, warmup: int = 2, reps: int = 5):
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        gen = torch.Generator(device=q.device).manual_seed(0)  # never touch the global RNG state of the run
        do = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=gen)

    def step():
        if grad:
            with torch.enable_grad():
                out = fn(q, k, v, causal)
                torch.autograd.grad(out, (q, k, v), do)
        else:
            with torch.no_grad():
                fn(q, k, v, causal)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]  # median, ms


def _choose_auto(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str:
    if q.device.type != "cuda":
        return "sdpa"
    device = _as_device(q.device)
    key = (str(device), q.dtype, q.shape[-1], causal, _bucket(q.shape[1]), _bucket(k.shape[1]))
    choice = _AUTO_CHOICES.get(key)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "sdpa"  # no timing inside a trace or a graph capture
    timings = {}
    for name in available_backends(device):
        if name in _SLOW_BACKENDS:
            continue
        try:
            timings[name] = _time_backend(_IMPLS[name], q, k, v, causal, grad=q.shape[1] == k.shape[1])
        except Exception:  # unsupported for this dtype / head dim / shape
            continue
    choice = min(timings, key=timings.get) if timings else "sdpa"
    _AUTO_CHOICES[key] = choice
    return choice


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------
def _validate(q: Tensor, k: Tensor, v: Tensor, causal: bool, backend: str, key_padding_mask: Tensor | None) -> None:
    if backend not in VALID_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(VALID_BACKENDS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have rank 4 [B, S, H, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, Sq, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"attention: q [B, Sq, H, D] = {tuple(q.shape)} and k/v [B, Sk, H, D] = {tuple(k.shape)} "
                         f"must agree in B, H and D")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"attention: dtype {q.dtype} not supported, expected one of {_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[1] == 0:
        raise ValueError("attention: k and v have no positions (Sk == 0)")
    if causal and Sq > k.shape[1]:
        raise ValueError(f"attention: causal attention needs Sq <= Sk (the queries are the last Sq positions), "
                         f"got Sq={Sq}, Sk={k.shape[1]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must be a bool tensor [B, Sk] (True = attend)")
        if tuple(key_padding_mask.shape) != (B, k.shape[1]):
            raise ValueError(f"attention: key_padding_mask must have shape [B, Sk] = {(B, k.shape[1])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    backend: str = "auto",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention, q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D].

    Scale 1/sqrt(D). With Sq < Sk the queries are the last Sq positions: query i attends keys j <= Sk - Sq + i.
    `backend` is one of VALID_BACKENDS (see the module docstring; "auto" measures on CUDA, sdpa on CPU).
    `key_padding_mask` [B, Sk] bool (True = a real key): padded keys are never attended (a query still sees its
    own key); backends that take no mask run sdpa instead. None: exactly the unmasked path.
    """
    _validate(q, k, v, causal, backend, key_padding_mask)
    if key_padding_mask is not None:
        return _masked(q, k, v, causal, key_padding_mask, backend)  # no "auto" trial: sdpa is the masked path
    if backend == "auto":
        backend = _choose_auto(q, k, v, causal)
    return _IMPLS[backend](q, k, v, causal)


__all__ = [
    "attention", "decode_attention", "decode_attention_bias", "use_decode_attention", "padded_causal_mask", "available_backends", "auto_choices", "reset_auto_choices", "BACKENDS",
    "VALID_BACKENDS",
]
