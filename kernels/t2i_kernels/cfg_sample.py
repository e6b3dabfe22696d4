"""Reproducible CFG sampling of image codes: the pure-torch reference of the C++/CUDA op `t2i::cfg_sample`.

    cfg_sample(logits (R, V), keys (b, 2) int64 [seed, caption index], step () int64, image_start, image_end,
               cfg_scale, temperature, top_k, impl="auto") -> codes (b,) int64 in [0, image_end - image_start)

A code is a pure function of (the caption's logits, seed, caption index, step): never of the batch it rides in,
its row, the batch size, the rank or the device. Per caption row i and image column j (I = image_end - image_start):

    m_j     = u_j + cfg_scale * (c_j - u_j)   over the image slice, in float64; c = row i, u = row b + i (R = 2b)
              (R = b: m_j = the logit, and cfg_scale must be 0)
    kept    = m_j >= the top_k-th largest m (top_k = 0: every column)
    bits_j  = Philox4x32-10(counter = (j // 4, step, caption_lo32, caption_hi32), key = (seed_lo32, seed_hi32))[j % 4]
    g_j     = -log(-log((bits_j + 0.5) / 2^32))                    a Gumbel(0, 1) variate
    code    = argmax over kept j of m_j * (1 / temperature) + g_j   (first index among equal maxima)
    top_k == 1: code = argmax_j m_j (greedy; no noise)

Gumbel-max draws exactly from softmax(m / temperature) restricted to the kept columns. The logs are
`log_portable` (frexp and an 11-term atanh series from +, -, *, / only), because libm's, CUDA's and torch's
vectorised `log` disagree in the last bit; every operation here is correctly rounded, in the same order as
csrc/cfg_sample.h, which the op compiles without FMA contraction. Hence op == reference, bit for bit, on CPU and
GPU. Integer Philox in int64 tensors: the 32 x 32 -> 64-bit products are formed from 16-bit halves so that no
intermediate exceeds 2^49 (no signed overflow).

`cfg_sample(..., impl=)`: "op" the C++/CUDA op (built on first use by t2i_csrc), "ref" this file, "auto" the op
when it can be built, else the reference (once, with a warning). Both trace under torch.compile (the op has a
fake kernel; the reference is plain torch).
"""

from __future__ import annotations

import warnings

import torch

IMPLS = ("auto", "op", "ref")
MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
LN2 = 0.6931471805599453
SQRT_HALF = 0.7071067811865476
TWO_POW_MINUS_32 = 2.0**-32
LOG_SERIES = tuple(1.0 / (2 * k + 1) for k in range(10, -1, -1))  # Horner order, as cfg_sample.h


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a (int64 holding uint32) * m (a 32-bit constant) -> (hi32, lo32), without overflowing int64."""
    x = a * (m & 0xFFFF)  # < 2^48
    y = a * (m >> 16)  # < 2^48; a * m = y * 2^16 + x
    hi = (y + (x >> 16)) >> 16
    lo = (((y & 0xFFFF) << 16) + x) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together); the four output words."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.int64) for t in (c0, c1, c2, c3, k0, k1)))
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def log_portable(y: torch.Tensor) -> torch.Tensor:
    """Natural log of float64 y > 0 with correctly rounded operations only (csrc/cfg_sample.h: log_portable)."""
    m, e = torch.frexp(y)  # y = m 2^e, m in [0.5, 1)
    low = m < SQRT_HALF
    m = torch.where(low, m * 2.0, m)
    e = torch.where(low, e - 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = torch.full_like(s, LOG_SERIES[0])
    for c in LOG_SERIES[1:]:
        p = p * s2 + c
    return e.to(torch.float64) * LN2 + (s + s) * p


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 tensor of 32-bit values -> float64 Gumbel(0, 1) variates, -log(-log(u)), u = (bits + 0.5) 2^-32."""
    u = (bits.to(torch.float64) + 0.5) * TWO_POW_MINUS_32
    return -log_portable(-log_portable(u))


def gumbel_noise(keys: torch.Tensor, step: torch.Tensor, width: int) -> torch.Tensor:
    """(b, 2) [seed, caption] keys, step () -> (b, width) float64 Gumbel noise of each caption at this step."""
    keys = keys.to(torch.int64)
    seed, caption = keys[:, 0:1], keys[:, 1:2]  # (b, 1)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c2, c3 = caption & MASK32, (caption >> 32) & MASK32
    blocks = torch.arange((width + 3) // 4, device=keys.device, dtype=torch.int64)[None, :]  # (1, ceil(I/4))
    c1 = torch.as_tensor(step, device=keys.device).to(torch.int64).reshape(1, 1) & MASK32
    words = philox4x32_10(blocks, c1, c2, c3, k0, k1)  # 4 x (b, ceil(I/4))
    bits = torch.stack(words, dim=-1).reshape(keys.shape[0], -1)[:, :width]  # (b, I): column j = word j % 4 of block j // 4
    return gumbel_from_bits(bits)


def mixed_logits(logits: torch.Tensor, b: int, image_start: int, image_end: int, cfg_scale: float) -> torch.Tensor:
    """(R, V) -> (b, I) float64: the image slice, guided as u + cfg_scale * (c - u) when R == 2b."""
    x = logits[:, image_start:image_end].float().to(torch.float64)  # exact widening, as the op
    if logits.shape[0] == b:
        return x
    cond, uncond = x[:b], x[b:]  # (b, I) each
    return uncond + cfg_scale * (cond - uncond)


def _check(logits: torch.Tensor, keys: torch.Tensor, image_start: int, image_end: int, cfg_scale: float,
           temperature: float, top_k: int) -> int:
    if logits.dim() != 2:
        raise ValueError(f"cfg_sample: logits must be (R, V), got {tuple(logits.shape)}")
    if keys.dim() != 2 or keys.shape[1] != 2 or keys.dtype != torch.int64:
        raise ValueError(f"cfg_sample: keys must be (b, 2) int64 [seed, caption index], got {tuple(keys.shape)} {keys.dtype}")
    b, rows = keys.shape[0], logits.shape[0]
    if b == 0 or rows not in (b, 2 * b):
        raise ValueError(f"cfg_sample: logits must have b or 2b rows for b = {b} keys, got {rows}")
    if rows == b and cfg_scale != 0:
        raise ValueError(f"cfg_sample: cfg_scale {cfg_scale} needs 2b rows [cond; uncond], got b = {b}")
    if not 0 <= image_start < image_end <= logits.shape[1]:
        raise ValueError(f"cfg_sample: image range [{image_start}, {image_end}) outside [0, {logits.shape[1]})")
    if temperature <= 0:
        raise ValueError(f"cfg_sample: temperature must be > 0 (top_k = 1 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"cfg_sample: top_k must be >= 0 (0 = all), got {top_k}")
    return b


def cfg_sample_ref(logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor | int, image_start: int, image_end: int,
                   cfg_scale: float = 0.0, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The reference: (R, V) logits -> (b,) int64 codes (see the module docstring for the exact formula)."""
    b = _check(logits, keys, image_start, image_end, cfg_scale, temperature, top_k)
    m = mixed_logits(logits, b, image_start, image_end, cfg_scale)  # (b, I) float64
    width = m.shape[1]
    if top_k == 1:
        return m.argmax(-1)  # greedy: first maximum
    score = m * (1.0 / temperature) + gumbel_noise(keys, torch.as_tensor(step), width)  # (b, I)
    if 0 < top_k < width:
        kth = torch.topk(m, top_k, dim=-1).values[:, -1:]  # (b, 1) k-th largest
        score = score.masked_fill(m < kth, float("-inf"))
    return score.argmax(-1)  # (b,) first maximum


def cfg_sample(logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor, image_start: int, image_end: int,
               cfg_scale: float = 0.0, temperature: float = 1.0, top_k: int = 0, impl: str = "auto") -> torch.Tensor:
    """Dispatch to the C++/CUDA op ("op"), the reference ("ref"), or the op when it builds ("auto")."""
    step = torch.as_tensor(step, dtype=torch.int64, device=logits.device)
    return resolve(impl)(logits, keys, step, image_start, image_end, float(cfg_scale), float(temperature), int(top_k))


def resolve(impl: str = "auto"):
    """The sampling function `impl` names, with cfg_sample_ref's positional signature (step a tensor).

    Resolve once, outside torch.compile: the op is then `torch.ops.t2i.cfg_sample` itself, which dynamo puts
    into the graph as one node (its fake kernel gives the shape), with no Python dispatch to trace.
    """
    if impl not in IMPLS:
        raise ValueError(f"cfg_sample: impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = "op" if op_available() else "ref"
    if impl == "ref":
        return cfg_sample_ref
    import t2i_csrc

    t2i_csrc.load()
    return torch.ops.t2i.cfg_sample


_OP_STATE: dict[str, bool] = {}


def op_available() -> bool:
    """Whether the C++ op loads here (built on the first call); warns once when it cannot be built."""
    if "ok" not in _OP_STATE:
        import t2i_csrc

        try:
            t2i_csrc.load()
            _OP_STATE["ok"] = True
        except t2i_csrc.CsrcBuildError as e:
            warnings.warn(f"{e}; sampling with the pure-torch reference (same codes, slower)", stacklevel=2)
            _OP_STATE["ok"] = False
    return _OP_STATE["ok"]


__all__ = ["cfg_sample", "cfg_sample_ref", "resolve", "philox4x32_10", "gumbel_noise", "log_portable", "op_available", "IMPLS"]
