"""A model of one training step on N GPUs, from measured pieces: the paper's 1M-token step on 64 A100s.

    compute  = tokens_per_step x FLOPs_per_token / (N x peak x MFU)
    comm     = sum over collectives of  wire_bytes(op, N) / (efficiency x link bandwidth)  +  calls x latency
    step     = compute + max(0, comm - overlap x compute)
    tokens/s/GPU = tokens_per_step / step / N;   days for 100B tokens = 1e11 / (tokens_per_step / step) / 86400

- FLOPs per token: t2i_ds.trainer.flops (6 N_matmul + 6 L d S) for open_lm-1b extended to 66,822 rows.
- MFU: the GPU benchmark's own measurement (benchmarks/results/train.jsonl, open_lm_1b rows with `perf/mfu`)
  when present, else an assumption stated as such (llm-foundry's MPT-1B at seq 2048 on 64 A100-40GB: 55.44%).
- Bytes per step: t2i_ds.trainer.comms (ZeRO-2: A gradient all-reduces of P x comm-dtype bytes and one
  all-gather of the bf16 partitions; ZeRO-3: per micro-batch all-gathers and reduce-scatters). The formulas are
  checked against DeepSpeed's comms logger at 2 CPU ranks in tests/test_world_size.py and recorded at 2 and
  4 ranks by benchmarks/bench_comms.py (results/comms.jsonl).
- Wire bytes per GPU: ring all-reduce 2(N-1)/N x S, all-gather and reduce-scatter (N-1)/N x S for a full buffer
  S. Bandwidth: NVLink inside a node; across nodes a ring is limited by each GPU's NIC (rail-optimised:
  one 200 Gb/s NIC per GPU = 25 GB/s per direction). Latency: ring steps x alpha per call (tree: 2 log2 N).
- Overlap: the share of compute time under which communication can hide (DeepSpeed's overlap_comm reduces
  gradient buckets during the backward, about 2/3 of the compute): an explicit input, assumed.

    python benchmarks/scale_model.py                       # 64 A100-80GB (8 x 8), ZeRO-2, the paper's step
    python benchmarks/scale_model.py --stage 3 --gpus 128 --overlap 0.8
    python benchmarks/scale_model.py --mfu 0.45 --ib-gbit 100 --out benchmarks/results/scale_model.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_RESULTS = ROOT / "benchmarks" / "results" / "train.jsonl"
COMMS_RESULTS = ROOT / "benchmarks" / "results" / "comms.jsonl"
ASSUMED_MFU = 0.5544  # llm-foundry scripts/train/benchmarking/README.md: MPT-1B, seq 2048, 64 x A100-40GB, 55.44%
PAPER_TOKENS = 100e9


@dataclass
class Inputs:
    """Every input of the model, with where its value comes from (`sources[name]`)."""

    gpus: int = 64
    gpus_per_node: int = 8
    model: str = "open_lm_1b"
    seq_len: int = 1152
    tokens_per_step: int = 1_048_576
    max_micro_batch: int = 16  # sequences per GPU per micro-step that fit (80 GB, activation checkpointing)
    stage: int = 2
    param_bytes: int = 2  # bf16 parameters on the wire
    grad_bytes: int = 4  # communication_data_type fp32 (ds_configs/)
    reduce_bucket: int = 50_000_000  # elements (ds_configs/)
    peak_tflops: float = 312.0  # A100 dense bf16
    mfu: float = ASSUMED_MFU
    nvlink_gbs: float = 600.0  # A100 SXM NVLink, both directions
    ib_gbit: float = 200.0  # per NIC
    nics_per_node: int = 8
    link_efficiency: float = 0.8  # achieved bus bandwidth / link peak
    latency_us: float = 5.0  # per ring step
    algo: str = "ring"  # all-reduce latency: ring (2(N-1) steps) or tree (2 log2 N)
    overlap: float = 2 / 3
    regather: float = 1.0  # ZeRO-3: share of parameters gathered again for the backward
    persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay gathered (ds_configs/zero3.json)
    sources: dict = field(default_factory=dict)


SOURCES = {
    "gpus": "given: 8 nodes x 8 A100-80GB", "gpus_per_node": "given", "model": "given: open_lm-1b extended to 66,822 rows",
    "seq_len": "given: paper", "tokens_per_step": "given: paper (1M tokens)", "max_micro_batch": "assumed (memory)",
    "stage": "given: ds_configs/zero2.json", "param_bytes": "given: bf16", "grad_bytes": "given: communication_data_type fp32",
    "reduce_bucket": "given: ds_configs/", "peak_tflops": "given: A100 datasheet, dense bf16",
    "mfu": f"assumed: llm-foundry MPT-1B on 64 A100-40GB, {ASSUMED_MFU:.2%}",
    "nvlink_gbs": "given: A100 SXM NVLink 600 GB/s", "ib_gbit": "given: 200 Gb/s InfiniBand per NIC",
    "nics_per_node": "given: 8 per node", "link_efficiency": "assumed", "latency_us": "assumed", "algo": "assumed",
    "overlap": "assumed: gradient reduction hidden behind the backward (~2/3 of compute)",
    "regather": "assumed: upper bound (ZeRO-3 releases and re-gathers every parameter for the backward)",
    "persistence_threshold": "given: ds_configs/zero3.json",
}


def measured_mfu(path: Path = TRAIN_RESULTS, model: str = "open_lm_1b") -> tuple[float, str] | None:
    """The latest GPU measurement of MFU for `model` from bench_train's results, with a label."""
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("model") == model and r.get("perf/mfu")]
    if not rows:
        return None
    r = rows[-1]
    return float(r["perf/mfu"]), f"measured: bench_train.py on {r.get('device')} ({r.get('date')}, commit {r.get('commit')})"


def formula_check(path: Path = COMMS_RESULTS) -> str:
    """How well the volume formulas matched DeepSpeed's counted bytes (bench_comms.py results)."""
    if not path.is_file():
        return "formula (tests/test_world_size.py checks it within 5% at 2 CPU ranks)"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    ranks = sorted({r["ranks"] for r in rows})
    worst = max(r["max_rel_diff"] for r in rows)
    return (f"measured: DeepSpeed's comms logger at {' and '.join(map(str, ranks))} CPU ranks, ZeRO-2 and ZeRO-3, "
            f"within {worst * 100:.4f}% of the formula (results/comms.jsonl)")


def parameters(model: str) -> dict[str, tuple[int, bool]]:
    from t2i_ds.model import build_model, model_preset
    from t2i_ds.trainer.comms import parameter_sizes
    from t2i_ds.vocab import Vocab

    return parameter_sizes(build_model(model_preset(model, vocab_size=Vocab().size), device="meta"))


def batch_plan(inp: Inputs, gpus: int) -> tuple[int, int] | None:
    """(micro_batch, grad_accum) with the fewest accumulation steps within 10% of tokens_per_step, or None."""
    seqs = inp.tokens_per_step / inp.seq_len
    best = None
    for micro in range(inp.max_micro_batch, 0, -1):
        accum = max(1, round(seqs / (gpus * micro)))
        error = abs(accum * micro * gpus - seqs) / seqs
        if error <= 0.1 and (best is None or (accum, error) < (best[1], best[2])):
            best = (micro, accum, error)
    return None if best is None else best[:2]


def bandwidth(inp: Inputs, gpus: int) -> float:
    """Bytes/s per GPU per direction a ring achieves: NVLink inside a node, the per-GPU NIC across nodes."""
    nvlink = inp.nvlink_gbs / 2 * 1e9
    nic = inp.ib_gbit / 8 * 1e9 * inp.nics_per_node / inp.gpus_per_node
    return inp.link_efficiency * (nvlink if gpus <= inp.gpus_per_node else min(nvlink, nic))


def project(inp: Inputs, gpus: int | None = None, params: dict | None = None) -> dict | None:
    """The step on `gpus` GPUs (default inp.gpus): seconds of compute and of each collective, tokens/s/GPU, days."""
    from t2i_ds.model import model_preset
    from t2i_ds.trainer.comms import ring_wire_bytes, stage2_bytes, stage3_bytes
    from t2i_ds.trainer.flops import flops_per_token
    from t2i_ds.vocab import Vocab

    n = gpus or inp.gpus
    plan = batch_plan(inp, n)
    if plan is None:
        return None
    micro, accum = plan
    params = params or parameters(inp.model)
    total = sum(p for p, _ in params.values())
    tokens = micro * accum * n * inp.seq_len
    fpt = flops_per_token(model_preset(inp.model, vocab_size=Vocab().size), inp.seq_len)
    compute = tokens * fpt / (n * inp.peak_tflops * 1e12 * inp.mfu)
    if inp.stage == 3:
        vol = stage3_bytes(params, n, accum, inp.grad_bytes, inp.param_bytes, inp.persistence_threshold, inp.regather)
    else:
        vol = stage2_bytes(params, n, accum, inp.grad_bytes, inp.param_bytes)
    bw, alpha = bandwidth(inp, n), inp.latency_us * 1e-6
    ar_steps = 2 * math.log2(n) if inp.algo == "tree" and n > 1 else 2 * (n - 1)
    buckets = math.ceil(total / inp.reduce_bucket)
    comm = {
        "all_reduce": ring_wire_bytes("all_reduce", vol.all_reduce, n) / bw + accum * buckets * ar_steps * alpha,
        "all_gather": ring_wire_bytes("all_gather", vol.all_gather * n, n) / bw
        + (1 if inp.stage == 2 else accum * (1 + inp.regather)) * buckets * (n - 1) * alpha,
        "reduce_scatter": ring_wire_bytes("reduce_scatter", vol.reduce_scatter, n) / bw + accum * buckets * (n - 1) * alpha,
    }
    comm = {k: (v if (n > 1 and getattr(vol, k)) else 0.0) for k, v in comm.items()}
    comm_s = sum(comm.values())
    exposed = max(0.0, comm_s - inp.overlap * compute)
    step = compute + exposed
    return {"gpus": n, "nodes": math.ceil(n / inp.gpus_per_node), "micro_batch": micro, "grad_accum": accum,
            "tokens_per_step": tokens, "params": total, "flops_per_token": fpt, "compute_s": compute,
            "comm_s": comm_s, **{f"comm_{k}_s": v for k, v in comm.items()}, "exposed_comm_s": exposed, "step_s": step,
            "tokens_per_s_per_gpu": tokens / step / n, "mfu_effective": inp.mfu * compute / step,
            "days_for_100B": PAPER_TOKENS / (tokens / step) / 86400, "comm_hidden": comm_s <= inp.overlap * compute}


def crossover(inp: Inputs, params: dict, limit: int = 1024) -> tuple[int | None, int | None]:
    """(first, always): the smallest GPU count (whole nodes) where communication no longer hides behind
    compute, and the smallest from which it never hides again (accumulation steps change with N, so the two
    can differ). Sizes without a batch split within 10% are skipped."""
    exposed = {}
    for n in range(inp.gpus_per_node, limit + 1, inp.gpus_per_node):
        r = project(inp, n, params)
        if r is not None:
            exposed[n] = not r["comm_hidden"]
    first = next((n for n, e in exposed.items() if e), None)
    always = None
    for n in sorted(exposed, reverse=True):
        if not exposed[n]:
            break
        always = n
    return first, always


def parse_args(argv: list[str] | None = None) -> tuple[Inputs, str]:
    d = Inputs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in SOURCES:
        value = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None, help=f"default {value} ({SOURCES[name]})")
    p.add_argument("--out", default="", help="append the projection as a JSON line here")
    args = p.parse_args(argv)
    inp = Inputs(sources=dict(SOURCES))
    got = measured_mfu()
    if got is not None:
        inp.mfu, inp.sources["mfu"] = got
    for name in SOURCES:
        value = getattr(args, name)
        if value is not None:
            setattr(inp, name, value)
            inp.sources[name] = "given on the command line"
    return inp, args.out


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)


def report(inp: Inputs) -> dict:
    params = parameters(inp.model)
    main_row = project(inp, params=params)
    sizes = (8, 16, 32, 64, 128, 256)
    sweep = [r for n in sizes if (r := project(inp, n, params)) is not None]
    unsplit = [n for n in sizes if n not in {r["gpus"] for r in sweep}]
    cross = crossover(inp, params)
    print("| input | value | source |\n|---|---|---|")
    for name in SOURCES:
        print(f"| {name} | {_fmt(getattr(inp, name))} | {inp.sources[name]} |")
    print(f"| bytes per step | ZeRO-{inp.stage} formula | {formula_check()} |")
    print()
    print("| GPUs | micro x accum | compute s | comm s (all-reduce / all-gather / reduce-scatter) | exposed s | step s "
          "| tokens/s/GPU | effective MFU | days for 100B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sweep:
        print(f"| {r['gpus']} | {r['micro_batch']} x {r['grad_accum']} | {r['compute_s']:.3f} | {r['comm_s']:.3f} "
              f"({r['comm_all_reduce_s']:.3f} / {r['comm_all_gather_s']:.3f} / {r['comm_reduce_scatter_s']:.3f}) | "
              f"{r['exposed_comm_s']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu_effective']:.1%} "
              f"| {r['days_for_100B']:.2f} |")
    for n in unsplit:
        print(f"| {n} | no split of {inp.tokens_per_step:,} tokens within 10% | | | | | | | |")
    print()
    if main_row:
        print(f"{inp.gpus} GPUs: {main_row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, {main_row['step_s']:.3f} s per "
              f"{main_row['tokens_per_step']:,}-token step, {main_row['days_for_100B']:.2f} days for 100B tokens")
    first, always = cross
    print(f"communication stops hiding behind compute at {first} GPUs, and never hides again from {always} GPUs"
          if first else "communication stays hidden at every size with a batch split")
    return {"inputs": {k: v for k, v in asdict(inp).items() if k != "sources"}, "sources": inp.sources,
            "projection": main_row, "crossover_gpus": cross[0], "exposed_from_gpus": cross[1], "sweep": sweep}


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    inp, out = parse_args(argv)
    result = report(inp)
    if out:
        from t2i_ds.provenance import git_revision

        row = {"bench": "scale_model", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_revision(), **result}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
