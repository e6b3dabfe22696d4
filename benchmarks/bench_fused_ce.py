"""Benchmark fused linear + cross-entropy against its baselines, side by side, at the paper's shape.

    python benchmarks/bench_fused_ce.py                       # N = 1152*b, b in {1,4,8,16}, H=2048, V=66822, bf16
    python benchmarks/bench_fused_ce.py --batches 8 --impls triton eager
    python benchmarks/bench_fused_ce.py --smoke --out /tmp/x.jsonl   # tiny shapes on CPU (Triton interpreter)

Each implementation computes the training objective: per-token fp32 loss, then per-modality masked sums
(text / image / special) with ``modality_sums``, then their sum as the scalar that is backpropagated. The sum-mode
implementations (``sum_*``, the trainer's path) return that scalar directly with the per-token losses detached
beside it; the modality sums are then taken of those, as the LM head does.
Modes: forward, backward (of a retained graph), total (forward + backward), timed with
``triton.testing.do_bench`` (median, 20th and 80th percentiles) on CUDA, a ``time.perf_counter`` loop on CPU.
Effective TFLOP/s uses the no-recompute count: 2NHV forward, 4NHV backward, 6NHV total (the per-token fused
kernel and the chunked path do 8NHV in total because they recompute logits; the sum mode does 6NHV, all of it in
its forward, so for ``sum_*`` only the total time compares). Peak memory: ``max_memory_allocated`` during one forward + backward
minus the memory held before it (inputs), after ``reset_peak_memory_stats``.
Every result is appended as one JSON line to ``--out``; a markdown table is printed at the end.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fused_ce.jsonl"
ALL_IMPLS = ("eager", "compile", "liger", "cce", "torch_lce", "torch_lce_chunked", "chunked", "triton",
             "sum_chunked", "sum_triton")
SUM_IMPLS = ("sum_chunked", "sum_triton")  # (h, w, targets) -> (loss_sum, per-token loss detached)
IGNORE = -100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16], help="sequences per micro-batch b")
    p.add_argument("--seq", type=int, default=1152, help="tokens per sequence; N = seq * b")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--text-vocab", type=int, default=50432)
    p.add_argument("--image-vocab", type=int, default=16384)
    p.add_argument("--special-vocab", type=int, default=6)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of targets set to ignore_index")
    p.add_argument("--impls", nargs="+", choices=ALL_IMPLS, default=list(ALL_IMPLS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file the results are appended to")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, fp32, no torch.compile; runs on CPU through the Triton interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.seq, args.hidden = [1], 24, 32
        args.text_vocab, args.image_vocab, args.special_vocab = 300, 64, 6
        args.dtype = "fp32" if args.dtype == "bf16" else args.dtype      # the interpreter's bf16 dot is wrong
        args.impls = [i for i in args.impls if i != "compile"]
    return args


# ------------------------------------------------------------------------------------------------------------
# implementations: each maps (h [N, H], w [V, H], targets [N]) -> per-token loss [N]
# ------------------------------------------------------------------------------------------------------------


def build_impls(names, boundaries):
    """{name: loss_fn} for the requested implementations that are available here, and {name: reason} skipped."""
    from t2i_kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_torch
    from t2i_kernels.cross_entropy import triton_available

    impls, skipped = {}, {}
    for name in names:
        if name == "eager":
            impls[name] = lambda h, w, t: linear_cross_entropy_torch(h, w, t, IGNORE)
        elif name == "compile":
            impls[name] = torch.compile(lambda h, w, t: linear_cross_entropy_torch(h, w, t, IGNORE))
        elif name == "chunked":
            impls[name] = lambda h, w, t: chunked_linear_cross_entropy(h, w, t, IGNORE)
        elif name == "triton":
            if not triton_available():
                skipped[name] = "triton not importable"
                continue
            from t2i_kernels.fused_linear_ce import fused_linear_cross_entropy

            impls[name] = lambda h, w, t: fused_linear_cross_entropy(h, w, t, IGNORE)
        elif name in SUM_IMPLS:
            if name == "sum_triton" and not triton_available():
                skipped[name] = "triton not importable"
                continue
            from t2i_kernels.ce_sum import linear_cross_entropy_sum

            impls[name] = lambda h, w, t, p=name[4:]: linear_cross_entropy_sum(
                h, w, t, IGNORE, grad_pass="triton" if p == "triton" else "torch")
        elif name in ("torch_lce", "torch_lce_chunked"):
            if not hasattr(torch.nn.functional, "linear_cross_entropy"):
                skipped[name] = f"torch {torch.__version__} has no F.linear_cross_entropy"
                continue
            if name == "torch_lce_chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
                skipped[name] = f"torch {torch.__version__} has F.linear_cross_entropy but no LinearCrossEntropyOptions"
                continue
            opts = torch.nn.LinearCrossEntropyOptions() if name == "torch_lce_chunked" else None
            impls[name] = lambda h, w, t, o=opts: torch.nn.functional.linear_cross_entropy(
                h, w, t, reduction="none", ignore_index=IGNORE, options=o).float()
        elif name == "liger":
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            except Exception as e:  # noqa: BLE001 - optional baseline
                skipped[name] = f"liger_kernel not importable ({type(e).__name__})"
                continue
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none", accum_dtype=torch.float32)
            impls[name] = lambda h, w, t, f=liger: f(w, h, t).float()
        elif name == "cce":
            try:
                from cut_cross_entropy import linear_cross_entropy as cce_lce
            except Exception as e:  # noqa: BLE001 - optional baseline
                skipped[name] = f"cut_cross_entropy not importable ({type(e).__name__})"
                continue
            impls[name] = _cce_exact(cce_lce)
    return impls, skipped


def _cce_exact(cce_lce):
    """CCE without gradient filtering: impl='cce_exact' in recent releases, impl='cce', filter_eps=None before."""
    def fn(h, w, t):
        try:
            return cce_lce(h, w, t, ignore_index=IGNORE, reduction="none", impl="cce_exact").float()
        except (NotImplementedError, ValueError, KeyError):
            return cce_lce(h, w, t, ignore_index=IGNORE, reduction="none", impl="cce", filter_eps=None).float()
    return fn


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------


def _timer(cuda: bool, warmup_ms: int, rep_ms: int):
    """fn -> (median, p20, p80) in ms."""
    if cuda:
        import triton.testing

        def bench(fn, grad_to_none):
            return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                 quantiles=[0.5, 0.2, 0.8]))
    else:  # CPU: the --smoke run, which only proves the script works (one untimed-quality call per mode)
        def bench(fn, grad_to_none, reps=1):
            times = []
            for _ in range(reps):
                for x in grad_to_none:
                    x.grad = None
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times), min(times), max(times)
    return bench


def measure(loss_fn, h, w, targets, boundaries, bench, cuda, sum_mode=False):
    from t2i_kernels.cross_entropy import modality_sums

    def objective():
        if sum_mode:                                                      # the LM head's path
            loss_sum, loss = loss_fn(h, w, targets)                       # [], [N] detached
            modality_sums(loss, targets, boundaries, IGNORE)              # logged statistics, no graph
            return loss_sum
        loss = loss_fn(h, w, targets)                                     # [N] fp32
        sums, _counts = modality_sums(loss, targets, boundaries, IGNORE)  # [3], [3]
        return sums.sum()

    fwd = bench(objective, [h, w])
    out = objective()
    bwd = bench(lambda: out.backward(retain_graph=True), [h, w])
    del out
    total = bench(lambda: objective().backward(), [h, w])

    peak_mib = None
    if cuda:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        objective().backward()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    h.grad = w.grad = None
    return fwd, bwd, total, peak_mib


def check_against_eager(loss_fn, h, w, targets, sum_mode=False):
    """max |loss - eager loss| over tokens: a sanity check that each timed implementation computes the same thing."""
    from t2i_kernels.chunked_ce import linear_cross_entropy_torch

    with torch.no_grad():
        loss = loss_fn(h, w, targets)[1] if sum_mode else loss_fn(h, w, targets)
        return (loss.float() - linear_cross_entropy_torch(h, w, targets, IGNORE)).abs().max().item()


# ------------------------------------------------------------------------------------------------------------
# bookkeeping
# ------------------------------------------------------------------------------------------------------------


def environment(cuda: bool) -> dict:
    from t2i_ds.provenance import git_revision

    commit = git_revision()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def make_inputs(N, H, V, dtype, ignore_frac, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignore_frac] = IGNORE
    return h, w, targets.to(device)


def markdown_table(rows) -> str:
    lines = ["| b | N | impl | fwd ms | bwd ms | total ms | TFLOP/s (6NHV) | peak MiB | max dloss vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['b']} | {r['N']} | {r['impl']} | {r['error']} | | | | | |")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['b']} | {r['N']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
                     f"{r['total_ms']:.3f} | {r['tflops_total']:.3g} | {peak} | {r['max_abs_diff_vs_eager']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        # Triton kernels on CPU tensors need the interpreter, chosen before triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    H = args.hidden
    V = args.text_vocab + args.image_vocab + args.special_vocab
    boundaries = (args.text_vocab, args.text_vocab + args.image_vocab)
    env = environment(cuda)
    bench = _timer(cuda, args.warmup, args.rep)
    impls, skipped = build_impls(args.impls, boundaries)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in args.batches:
        N = args.seq * b
        h, w, targets = make_inputs(N, H, V, dtype, args.ignore_frac, device)
        flops = 2.0 * N * H * V                                          # one [N, H] x [H, V] GEMM
        for name, loss_fn in impls.items():
            row = {**env, "smoke": args.smoke, "b": b, "N": N, "H": H, "V": V, "dtype": args.dtype,
                   "ignore_frac": args.ignore_frac, "impl": name}
            try:
                sum_mode = name in SUM_IMPLS
                row["max_abs_diff_vs_eager"] = check_against_eager(loss_fn, h, w, targets, sum_mode)
                fwd, bwd, total, peak = measure(loss_fn, h, w, targets, boundaries, bench, cuda, sum_mode)
                row.update(fwd_ms=fwd[0], bwd_ms=bwd[0], total_ms=total[0],
                           fwd_ms_p20_p80=fwd[1:], bwd_ms_p20_p80=bwd[1:], total_ms_p20_p80=total[1:],
                           tflops_fwd=flops / (fwd[0] * 1e-3) / 1e12,
                           tflops_bwd=2 * flops / (bwd[0] * 1e-3) / 1e12,
                           tflops_total=3 * flops / (total[0] * 1e-3) / 1e12,
                           peak_mib=peak, error=None)
            except Exception as e:  # noqa: BLE001 - one failing baseline (OOM, missing feature) must not end the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                h.grad = w.grad = None
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"b={b} N={N} {name}: " + ("ERROR " + row["error"] if row["error"] else
                                             f"total {row['total_ms']:.3f} ms"), file=sys.stderr)
        del h, w, targets
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit'][:10]}, "
          f"H={H}, V={V}, {args.dtype}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
