"""End-to-end training throughput through the real trainer, and its projection to 64 A100s.

Runs `t2i_ds.train` (DeepSpeed engine, synthetic sequences of the paper's layout) for a few steps,
reads the trainer's own metrics (tokens/s per device, model TFLOP/s, MFU, peak memory), appends one
JSON line per configuration to benchmarks/results/train.jsonl with device, versions, commit and
date, and prints a table with the projection to 64 A100-80GB of benchmarks/scale_model.py: compute
from this run's MFU (transferred to A100: an assumption, H100 and A100 differ in bandwidth/compute
ratio), communication from the ZeRO volume formulas (counted with DeepSpeed's comms logger) over
NVLink / InfiniBand ring costs, overlap as stated there. On CPU (no peak FLOP/s known) no projection
is printed.

    python benchmarks/bench_train.py --preset open_lm_1b --micro-batch 8 --ds-config ds_configs/zero2.json
    python benchmarks/bench_train.py --smoke          # debug model on CPU: checks the script end to end
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
sys.path.insert(0, str(ROOT))



def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    info["n_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return info


def run_trainer(args, run_dir: Path) -> list[dict]:
    sets = {
        "train.data_source": "synthetic",
        "train.steps": str(args.steps),
        "train.micro_batch": str(args.micro_batch),
        "train.log_every": str(args.log_every),
        "train.ckpt_every": "0",
        "train.save_final": "false",  # a throughput run: no checkpoint (open_lm-1b's would be ~20 GB)
        "train.run_dir": str(run_dir),
        "model.preset": args.preset,
        "model.grad_checkpointing": json.dumps(args.grad_checkpointing),
        "model.overrides": json.dumps({"loss_impl": args.loss_impl, "attn_backend": args.attn_backend}),
    }
    if args.tokens_per_step:
        sets["train.tokens_per_step"] = str(args.tokens_per_step)
    cmd = [sys.executable, "-m", "t2i_ds.train", "--ds_config", args.ds_config, "--preset", args.run_preset]
    if args.gpus > 1:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus), "--module", "t2i_ds.train",
               "--ds_config", args.ds_config, "--preset", args.run_preset]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for extra in args.set:
        cmd += ["--set", extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def summarise(metrics: list[dict], skip: int) -> dict:
    """Mean over logged windows after the first `skip` (warm-up, allocator, autotune)."""
    kept = metrics[skip:] or metrics[-1:]
    keys = ["perf/tokens_per_s_per_device", "perf/tflops_per_device", "perf/mfu", "mem/peak_allocated_gib", "loss/total"]
    return {k: sum(m[k] for m in kept) / len(kept) for k in keys if all(k in m for m in kept)}


def project(summary: dict, model: str, stage: int) -> dict:
    """64 x A100-80GB through benchmarks/scale_model.py, with this run's MFU (empty without a measured MFU)."""
    if "perf/mfu" not in summary or model != "open_lm_1b":
        return {}
    from scale_model import SOURCES, Inputs
    from scale_model import project as scale_project

    inp = Inputs(mfu=summary["perf/mfu"], stage=stage, sources={**SOURCES, "mfu": "measured: this run (bench_train.py)"})
    r = scale_project(inp)
    if r is None:
        return {}
    return {"a100_tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "a100x64_tokens_per_s": r["tokens_per_s_per_gpu"] * 64,
            "a100x64_step_s": r["step_s"], "a100x64_exposed_comm_s": r["exposed_comm_s"], "days_for_100B": r["days_for_100B"],
            "projection_inputs": {k: getattr(inp, k) for k in SOURCES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="open_lm_1b", help="model preset")
    p.add_argument("--run-preset", default="paper_synthetic", help="run preset the overrides apply to")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--tokens-per-step", type=int, default=0, help="0: micro_batch x seq_len x gpus (no accumulation)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--skip-windows", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--loss-impl", default="auto")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra trainer overrides")
    p.add_argument("--smoke", action="store_true", help="debug model on CPU, a few steps")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.jsonl"))
    args = p.parse_args()
    if args.smoke:
        args.preset, args.run_preset, args.micro_batch, args.steps, args.log_every = "debug", "debug", 2, 4, 2
        args.loss_impl, args.skip_windows = "torch", 0
    if not args.tokens_per_step:
        from t2i_ds.config import preset

        seq_len = preset(args.run_preset).vocab.seq_len
        args.tokens_per_step = args.micro_batch * seq_len * args.gpus
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not __import__("torch").cuda.is_available() else "cuda")

    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_trainer(args, Path(tmp) / "run")
        cfg = json.loads((Path(tmp) / "run" / "config.json").read_text())
    from t2i_ds.config import from_dict
    from t2i_ds.provenance import git_revision
    from t2i_ds.trainer.flops import flops_per_token
    from t2i_ds.trainer.parallelize import model_args

    c = from_dict(cfg)
    fpt = flops_per_token(model_args(c, c.vocab.build()), c.vocab.seq_len)
    summary = summarise(metrics, args.skip_windows)
    row = {
        "bench": "train", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_revision(),
        **device_info(), "model": args.preset, "ds_config": Path(args.ds_config).name, "micro_batch": args.micro_batch,
        "tokens_per_step": args.tokens_per_step, "steps": args.steps, "gpus": args.gpus, "loss_impl": args.loss_impl,
        "attn_backend": args.attn_backend, "grad_checkpointing": args.grad_checkpointing, "flops_per_token": fpt,
        **summary, **project(summary, args.preset, json.loads(Path(args.ds_config).read_text())["zero_optimization"]["stage"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("| device | model | micro | tok/s/dev | TFLOP/s/dev | MFU | peak GiB | 64xA100 tok/s | days/100B |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = lambda k, fmt: format(row[k], fmt) if k in row else "-"  # noqa: E731
    print(f"| {row['device']} | {row['model']} | {row['micro_batch']} | {g('perf/tokens_per_s_per_device', '.0f')} | "
          f"{g('perf/tflops_per_device', '.1f')} | {g('perf/mfu', '.1%')} | {g('mem/peak_allocated_gib', '.1f')} | "
          f"{g('a100x64_tokens_per_s', '.3g')} | {g('days_for_100B', '.1f')} |")


if __name__ == "__main__":
    main()
