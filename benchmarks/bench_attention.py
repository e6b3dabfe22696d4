"""Attention backends and fused elementwise kernels, side by side; results appended as JSON lines.

    python benchmarks/bench_attention.py                      # CUDA: B in {1,4,8,16} x 1152 tokens, bf16
    python benchmarks/bench_attention.py --smoke --out x.jsonl # tiny shapes; runs on CPU through TRITON_INTERPRET=1

Attention: every backend `available_backends(device)` reports, causal, H=16, D=128; modes fwd, bwd, total (fwd +
bwd); median ms with p20/p80 from `triton.testing.do_bench` on CUDA (perf_counter medians on CPU, meaningless as
speed, present only to exercise the script), TFLOP/s with
    fwd FLOPs = 2 matmuls * 2 * B*H*S*S*D / 2 (causal half),  bwd = 2.5 * fwd (5 matmuls, recomputing S),
and peak memory above the inputs for "total". Elementwise: our Triton LayerNorm / rotary / SwiGLU against torch
eager and torch.compile of the same eager code, in GB/s of compulsory traffic (each tensor read or written once).
One JSON line per (kernel, shape, implementation, mode) goes to --out (default benchmarks/results/attention.jsonl),
stamped with device, torch / triton / CUDA versions, git commit and UTC date; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run Triton only interpreted; before `import triton`

import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "attention.jsonl"

import torch.nn.functional as F  # noqa: E402

from t2i_ds.model.attention import attention, available_backends  # noqa: E402
from t2i_kernels.layer_norm import layer_norm  # noqa: E402
from t2i_kernels.rotary import rotary, rotary_cos_sin  # noqa: E402
from t2i_kernels.swiglu import swiglu  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
# Environment stamp and timing
# --------------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    from t2i_ds.provenance import git_revision

    commit = git_revision()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": commit.endswith("-dirty"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def time_ms(fn, device: torch.device, smoke: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device.type == "cuda":
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    if not smoke:  # a smoke run only proves the script works: one untimed-quality call per mode
        fn()  # warm-up
    times = []
    for _ in range(1 if smoke else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def peak_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _fwd_bwd_fns(fn, inputs, grad_outputs):
    """Callables for the three modes. bwd replays one retained graph (autograd.grad, so no .grad accumulates)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def fwd():
        return fn(*inputs)

    def bwd():
        return torch.autograd.grad(outs, inputs, grad_outputs, retain_graph=True)

    def total():
        o = fn(*inputs)
        o = o if isinstance(o, tuple) else (o,)
        return torch.autograd.grad(o, inputs, grad_outputs)

    return {"fwd": fwd, "bwd": bwd, "total": total}


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------
def attention_flops(B: int, S: int, H: int, D: int, causal: bool) -> dict[str, float]:
    fwd = 2 * 2 * B * H * S * S * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "total": 3.5 * fwd}


def bench_attention(args, device, dtype, env) -> list[dict]:
    rows = []
    backends = args.backends or available_backends(device)
    for B in args.batch:
        S, H, D = args.seq, args.heads, args.head_dim
        gen = torch.Generator(device="cpu").manual_seed(0)
        fused = torch.randn(B, S, 3 * H * D, generator=gen).to(device, dtype)  # in_proj output, as the model
        q, k, v = (t.view(B, S, H, D) for t in fused.chunk(3, dim=-1))
        do = torch.randn(B, S, H, D, generator=gen).to(device, dtype)
        flops = attention_flops(B, S, H, D, causal=True)
        for backend in backends:
            shape = {"B": B, "S": S, "H": H, "D": D}
            base = {**env, "bench": "attention", "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                    "causal": True, "backend": backend, "smoke": args.smoke}
            try:
                fns = _fwd_bwd_fns(lambda a, b, c: attention(a, b, c, causal=True, backend=backend), (q, k, v), do)
                mem = peak_mb(fns["total"], device)
                for mode, fn in fns.items():
                    ms, p20, p80 = time_ms(fn, device, args.smoke)
                    rows.append({**base, "mode": mode, "ms": ms, "ms_p20": p20, "ms_p80": p80,
                                 "tflops": flops[mode] / ms * 1e-9, "peak_mem_mb": mem if mode == "total" else None})
            except Exception as e:  # e.g. OOM for eager at B=16, a kernel refusing a shape: recorded, not fatal
                rows.append({**base, "mode": "total", "error": f"{type(e).__name__}: {e}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------------------
# Fused elementwise kernels: ours vs torch eager vs torch.compile(eager)
# --------------------------------------------------------------------------------------------------------------
def _rotary_torch(q, k, cos, sin):
    def rot(x):  # open_lm's RotaryEmbedding in x's dtype
        c = torch.cat((cos, cos), -1).unsqueeze(-2).to(x.dtype)
        s = torch.cat((sin, sin), -1).unsqueeze(-2).to(x.dtype)
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat((-x2, x1), -1) * s

    return rot(q), rot(k)


def _swiglu_torch(x12):
    gate, up = x12.chunk(2, dim=-1)
    return F.silu(gate) * up


def elementwise_cases(tokens: int, dim: int, hidden: int, H: int, D: int, B: int, device, dtype):
    """name -> (impls {name: fn}, inputs, grad_outputs, bytes per mode, shape)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    e = torch.finfo(dtype).bits // 8
    S = tokens // B
    x, w, b = rnd(tokens, dim), rnd(dim), rnd(dim)
    cos, sin = rotary_cos_sin(torch.arange(S, device=device), D)
    x12 = rnd(tokens, 2 * hidden)
    qk = (rnd(B, S, H, D), rnd(B, S, H, D))
    ln_eager = lambda x_, w_, b_: F.layer_norm(x_, (dim,), w_, b_, 1e-5)  # noqa: E731
    rot_ours = lambda q_, k_: rotary(q_, k_, cos, sin)  # noqa: E731
    rot_eager = lambda q_, k_: _rotary_torch(q_, k_, cos, sin)  # noqa: E731
    return {
        "layer_norm": ({"triton": layer_norm, "torch": ln_eager}, (x, w, b), rnd(tokens, dim),
                       {"fwd": 2 * tokens * dim * e, "bwd": 3 * tokens * dim * e}, {"M": tokens, "N": dim}),
        "rotary": ({"triton": rot_ours, "torch": rot_eager}, qk, (rnd(B, S, H, D), rnd(B, S, H, D)),
                   {"fwd": 4 * B * S * H * D * e, "bwd": 4 * B * S * H * D * e}, {"B": B, "S": S, "H": H, "D": D}),
        "swiglu": ({"triton": swiglu, "torch": _swiglu_torch}, (x12,), rnd(tokens, hidden),
                   {"fwd": 3 * tokens * hidden * e, "bwd": 5 * tokens * hidden * e}, {"M": tokens, "hidden": hidden}),
    }


def bench_elementwise(args, device, dtype, env) -> list[dict]:
    rows = []
    B = max(args.batch)
    cases = elementwise_cases(B * args.seq, args.dim, args.hidden, args.heads, args.head_dim, B, device, dtype)
    for kernel, (impls, inputs, douts, nbytes, shape) in cases.items():
        impls = dict(impls)
        if args.compile:
            impls["torch_compile"] = torch.compile(impls["torch"], dynamic=False)
        for impl, fn in impls.items():
            base = {**env, "bench": kernel, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                    "backend": impl, "smoke": args.smoke}
            try:
                fns = _fwd_bwd_fns(fn, inputs, douts)
                for mode in ("fwd", "bwd"):
                    ms, p20, p80 = time_ms(fns[mode], device, args.smoke)
                    rows.append({**base, "mode": mode, "ms": ms, "ms_p20": p20, "ms_p80": p80,
                                 "gbps": nbytes[mode] / ms * 1e-6})
            except Exception as e:
                rows.append({**base, "mode": "fwd", "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    lines = []
    att = [r for r in rows if r["bench"] == "attention"]
    if att:
        lines += ["| B | S | backend | fwd ms | bwd ms | total ms | fwd TFLOP/s | bwd TFLOP/s | total TFLOP/s "
                  "| peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["shape"]["B"], r["shape"]["S"], r["backend"]) for r in att)
        for B, S, backend in keys:
            by = {r["mode"]: r for r in att if (r["shape"]["B"], r["shape"]["S"], r["backend"]) == (B, S, backend)}
            if "error" in by.get("total", {}):
                lines.append(f"| {B} | {S} | {backend} | error: {by['total']['error'][:60]} ||||||| |")
                continue
            g = lambda m, f: by.get(m, {}).get(f)  # noqa: E731
            lines.append(f"| {B} | {S} | {backend} | {_fmt(g('fwd', 'ms'), '.3f')} | {_fmt(g('bwd', 'ms'), '.3f')} | "
                         f"{_fmt(g('total', 'ms'), '.3f')} | {_fmt(g('fwd', 'tflops'), '.1f')} | "
                         f"{_fmt(g('bwd', 'tflops'), '.1f')} | {_fmt(g('total', 'tflops'), '.1f')} | "
                         f"{_fmt(g('total', 'peak_mem_mb'), '.0f')} |")
    ew = [r for r in rows if r["bench"] != "attention"]
    if ew:
        lines += ["", "| kernel | shape | impl | fwd ms | fwd GB/s | bwd ms | bwd GB/s |",
                  "|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["bench"], r["backend"]) for r in ew)
        for kernel, impl in keys:
            by = {r["mode"]: r for r in ew if (r["bench"], r["backend"]) == (kernel, impl)}
            shape = next(iter(by.values()))["shape"]
            if "error" in by.get("fwd", {}):
                lines.append(f"| {kernel} | {shape} | {impl} | error: {by['fwd']['error'][:60]} |||")
                continue
            g = lambda m, f: by.get(m, {}).get(f)  # noqa: E731
            lines.append(f"| {kernel} | {shape} | {impl} | {_fmt(g('fwd', 'ms'), '.3f')} | "
                         f"{_fmt(g('fwd', 'gbps'), '.0f')} | {_fmt(g('bwd', 'ms'), '.3f')} | "
                         f"{_fmt(g('bwd', 'gbps'), '.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes, few repetitions; runs on CPU")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file the rows are appended to")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 4 8 16)")
    p.add_argument("--backends", nargs="+", default=None, help="attention backends (default: all available)")
    p.add_argument("--no-elementwise", dest="elementwise", action="store_false", help="attention only")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines")
    args = p.parse_args(argv)
    if args.smoke:  # small enough for the CPU interpreter in a few seconds
        args.batch = args.batch or [1, 2]
        args.seq, args.heads, args.head_dim, args.dim, args.hidden = 24, 2, 32, 64, 96
        args.compile = False  # Inductor's CPU compile costs minutes and measures nothing here
    else:
        args.batch = args.batch or [1, 4, 8, 16]
        args.seq, args.heads, args.head_dim, args.dim, args.hidden = 1152, 16, 128, 2048, 5632  # open_lm-1b
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("bench_attention: no CUDA device; use --smoke for the CPU (interpreter) run")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    env = environment(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def append(new_rows):  # as each part finishes: a run stopped by a time limit keeps what it measured
        with args.out.open("a") as f:
            for row in new_rows:
                f.write(json.dumps(row) + "\n")
        return new_rows

    rows = append(bench_attention(args, device, dtype, env))
    if args.elementwise:
        rows += append(bench_elementwise(args, device, dtype, env))
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, cuda {env['cuda']}, "
          f"commit {env['git_commit'][:10]}{'-dirty' if env['git_dirty'] else ''}, {env['date_utc']}")
    print(markdown(rows))
    print(f"\n{len(rows)} rows appended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
