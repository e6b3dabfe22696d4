"""Helpers for the trainer tests: run the real command in a subprocess, read its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DS_ZERO0 = str(ROOT / "ds_configs" / "zero0.json")
DS_ZERO2 = str(ROOT / "ds_configs" / "zero2.json")
DS_ZERO3 = str(ROOT / "ds_configs" / "zero3.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None), e.pop("MASTER_PORT", None)
    return e


def train(args: list[str], ranks: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m t2i_ds.train` (1 rank) or the DeepSpeed launcher with `ranks` CPU ranks.

    `timeout` catches a hang, not a slow machine: an 8-step two-rank run takes ~20 s on two quiet cores and went past
    300 s at a load average of 15 (a test failed for the machine, not the code); pytest's faulthandler_timeout prints
    every thread's stack after 300 s meanwhile."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "t2i_ds.train", *args]
    else:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port())]
        cmd = [*launcher, "--module", "t2i_ds.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir)}


# The debug-model runs several test modules read (golden losses, export, the fused kernel under ZeRO-3): trained
# once per session, on first use, by the `debug_run` fixture of conftest.py.
DEBUG_STEPS = 6
DEBUG_RUNS = {
    "single": (DS_ZERO0, 1, []),  # one rank: stage 0, as ds_configs/README's one-GPU advice
    "zero2_x2": (DS_ZERO2, 2, ["--set", "train.record_samples=true"]),  # the reference of tests/test_multinode.py
    "zero3_x2": (DS_ZERO3, 2, []),
    "zero3_x2_ckpt": (DS_ZERO3, 2, ["--set", "model.grad_checkpointing=true"]),  # recompute must not change the math
}


def train_debug_run(name: str, run_dir: Path) -> Path:
    """Train the debug preset for DEBUG_STEPS steps as DEBUG_RUNS[name] says; return its run directory."""
    ds, ranks, extra = DEBUG_RUNS[name]
    train(["--ds_config", ds, "--preset", "debug", "--set", f"train.steps={DEBUG_STEPS}", *extra,
           "--set", f"train.run_dir={run_dir}"], ranks=ranks)
    return run_dir


def write_random_shards(out: Path, n_shards: int, per_shard: int, vocab, seed: int = 0) -> None:
    """Token shards in the project's format with a learnable caption -> codes link."""
    from t2i_ds.data.shards import ShardSample, write_shard

    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            cap = rng.integers(2, vocab.real_text_size, int(rng.integers(0, 8)))
            codes = (np.arange(vocab.image_tokens) * (3 + (cap[0] if len(cap) else 0))) % vocab.image_size
            samples.append(ShardSample(f"s{s}-{i}", codes.astype(np.uint16), cap.astype(np.int32), "caption"))
        write_shard(out / f"tokens-{s:06d}.tar", samples)


def _rank_of(path: Path) -> int:
    return int(path.name.split("_")[3])  # zero_pp_rank_{r}_mp_rank_00_optim_states.pt


def zero_checkpoint_state(ckpt: Path, key: str) -> dict:
    """Full per-parameter `key` ("fp32", "exp_avg", "exp_avg_sq") reassembled by hand from the per-rank
    partitions of a ZeRO-2 or ZeRO-3 checkpoint (one parameter group / sub-group), independent of
    DeepSpeed's universal conversion. ZeRO-2: the ranks' flat partitions concatenated, parameters back to back;
    ZeRO-3: every parameter split into ceil(n / W) slices, slice r on rank r."""
    import torch

    files = sorted(Path(ckpt).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    states = [torch.load(f, weights_only=False, map_location="cpu")["optimizer_state_dict"] for f in files]
    world, out, offset = len(states), {}, 0
    if states[0]["zero_stage"] == 3:
        flats = [s["fp32_flat_groups"][0] if key == "fp32" else s["optimizer_state_dict"]["state"][0][key] for s in states]
        model = torch.load(Path(ckpt) / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
        for name, shape in model["param_shapes"][0].items():
            n, part = shape.numel(), -(-shape.numel() // world)
            out[name] = torch.cat([f[offset : offset + part] for f in flats])[:n].view(shape)
            offset += part
        return out
    flat = torch.cat([s["single_partition_of_fp32_groups"][0] if key == "fp32" else s["base_optimizer_state"]["state"][0][key]
                      for s in states])
    model = torch.load(Path(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)
    for name, shape in model["param_shapes"][0].items():
        out[name] = flat[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    return out


def sample_ids(run_dir: Path) -> dict[int, list[str]]:
    """step -> the sorted sample ids every rank trained on (train.record_samples)."""
    out: dict[int, list[str]] = {}
    for path in sorted((Path(run_dir) / "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["ids"])
    return {step: sorted(ids) for step, ids in sorted(out.items())}
