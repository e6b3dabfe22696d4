"""Bytes of every collective per optimizer step, counted by DeepSpeed's comms logger, against the formulas.

Runs the real trainer (debug model, synthetic data, fp32 on CPU ranks with gloo) with
`"comms_logger": {"enabled": true, "prof_all": true}` added to the ds_config, at 2 and 4 ranks, for ZeRO-2,
ZeRO-3 as shipped (the debug model's parameters are all under the persistence threshold: gathered once per
step) and ZeRO-3 with the threshold, live-parameter and reuse limits at 0 (every parameter gathered for the
forward and again for the backward of every micro-batch). The trainer reads the counts in-process at log
intervals (`comm/<op>/bytes_per_step`); each configuration appends one JSON line to
benchmarks/results/comms.jsonl: counted and formula bytes per op (t2i_ds.trainer.comms.expected_volume), the
largest relative difference, with device, versions, commit and date.

    python benchmarks/bench_comms.py                  # 2 and 4 ranks, three configurations (4 ranks on 2 cores: minutes)
    python benchmarks/bench_comms.py --ranks 2 --configs zero2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "zero2": ("zero2.json", {}),
    "zero3": ("zero3.json", {}),
    "zero3_regather": ("zero3.json", {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                                      "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}),
}
SEQS_PER_STEP = 8  # micro-batch 1: 4 micro-batches per step at 2 ranks, 2 at 4 ranks


def write_config(name: str, tmp: Path) -> tuple[Path, dict]:
    base, zero = CONFIGS[name]
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    cfg["zero_optimization"].update(zero)
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


def run(name: str, ranks: int, steps: int, tmp: Path) -> dict:
    from t2i_ds.config import preset
    from t2i_ds.trainer.comms import counted_volume, expected_volume, parameter_sizes
    from t2i_ds.trainer.parallelize import build_initialised_model

    path, ds = write_config(name, tmp)
    run_dir = tmp / f"{name}_{ranks}"
    seq_len = preset("debug").vocab.seq_len
    sets = [f"train.steps={steps}", "train.micro_batch=1", f"train.tokens_per_step={SEQS_PER_STEP * seq_len}",
            f"train.log_every={steps - 1}", f"train.run_dir={run_dir}"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--module", "t2i_ds.train",
           "--ds_config", str(path), "--preset", "debug", *sum((["--set", s] for s in sets), [])]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]  # steps 2..N
    plan = json.loads((run_dir / "plan.json").read_text())
    cfg = preset("debug")
    params = parameter_sizes(build_initialised_model(cfg, cfg.vocab.build()))
    expected = expected_volume(ds, params, world=ranks, accum=plan["grad_accum"], param_bytes=4)
    got = counted_volume(last)
    ops = ("all_reduce", "all_gather", "reduce_scatter")
    diff = max(abs(getattr(got, op) - getattr(expected, op)) / max(getattr(expected, op), 1.0) for op in ops)
    return {"config": name, "ranks": ranks, "grad_accum": plan["grad_accum"], "params": sum(n for n, _ in params.values()),
            "counted": {op: getattr(got, op) for op in ops}, "formula": {op: getattr(expected, op) for op in ops},
            "max_rel_diff": diff, "calls_per_step": {k[5:-15]: v for k, v in last.items() if k.endswith("/calls_per_step")}}


def provenance() -> dict:
    import deepspeed
    import torch

    from t2i_ds.provenance import git_revision

    return {"bench": "comms", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_revision(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "device": f"CPU ranks, gloo ({platform.processor() or platform.machine()})", "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comms.jsonl"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for ranks in args.ranks:
            for name in args.configs:
                rows.append({**provenance(), **run(name, ranks, args.steps, Path(d))})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("| config | ranks | A | op | counted B/step | formula B/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            if r["counted"][op] or r["formula"][op]:
                print(f"| {r['config']} | {r['ranks']} | {r['grad_accum']} | {op} | {r['counted'][op]:,.0f} | {r['formula'][op]:,.0f} |")
    print("largest relative difference:", max(r["max_rel_diff"] for r in rows))


if __name__ == "__main__":
    main()
