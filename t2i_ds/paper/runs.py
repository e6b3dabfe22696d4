"""Training runs of the paper's analyses: the real trainer, a text LM's export, and resumable sequences of runs.

    train_demo(run_dir, ["data.mode=text", ...], data_dir)   # the DeepSpeed trainer (`demo` preset) in this process
    train_demo_command(run_dir, [...], data_dir)             # the same run as a `python -m t2i_ds.train` argv
    export_text_lm(run_dir, path)                            # its text rows only: an open_lm text LM checkpoint
    run_tasks([Task(name, run_dir, work), ...])              # completed tasks skipped, interrupted ones redone

The trainer runs in this process (one rank, ZeRO-2 config, `t2i_ds.trainer.Trainer` as `python -m t2i_ds.train`
builds it): a sequence of short runs pays DeepSpeed's import and start once. A task is complete once its
`result.json` exists (written last, atomically, holding the logged scalars of its TensorBoard events); a task
without it is removed and run again from its start, so a killed sequence continues at its first incomplete task.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from t2i_ds.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG = ROOT / "ds_configs" / "zero2.json"
RESULT_FILE = "result.json"


class RunStopped(RuntimeError):
    """A run ended early on a stop signal; the sequence stops with it (its task stays incomplete)."""

    user_error = True


def demo_overrides(run_dir: Path, overrides: list[str], data_dir: Path | None = None) -> list[str]:
    """The `--set` overrides of one fresh run of the `demo` preset (pointed at the demo data set `data_dir` when
    given), without periodic checkpoints; `overrides` come last and win."""
    from t2i_ds.demo import data as demo_data

    sets = demo_data.train_overrides(data_dir) if data_dir is not None else []
    return sets + [f"train.run_dir={run_dir}", "train.resume=never", "train.ckpt_every=0", *overrides]


def train_demo_command(run_dir: Path, overrides: list[str], data_dir: Path | None = None,
                       ds_config: Path = DS_CONFIG) -> list[str]:
    """The same run as `train_demo`, as the argv of `python -m t2i_ds.train` (one process)."""
    cmd = [sys.executable, "-m", "t2i_ds.train", "--ds_config", str(ds_config), "--preset", "demo"]
    for item in demo_overrides(run_dir, overrides, data_dir):
        cmd += ["--set", item]
    return cmd


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what init_distributed sets


def train_demo(run_dir: Path, overrides: list[str], data_dir: Path | None = None, ds_config: Path = DS_CONFIG) -> None:
    """One fresh run of the `demo` preset in this process (the Trainer as `python -m t2i_ds.train` builds it),
    ending with a checkpoint unless train.save_final=false. The process-group variables the trainer sets are
    undone afterwards, so a later subprocess (a test's) picks its own rendezvous port."""
    import t2i_ds.demo.preset  # noqa: F401  (registers the demo preset)
    from t2i_ds.config import apply_overrides, preset
    from t2i_ds.trainer.batching import read_ds_config
    from t2i_ds.trainer.trainer import Trainer

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    trainer = Trainer(apply_overrides(preset("demo"), demo_overrides(run_dir, overrides, data_dir)),
                      read_ds_config(str(ds_config)))
    try:
        trainer.fit()
    finally:
        trainer.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if trainer.step < trainer.steps:  # SIGTERM/SIGINT: the trainer saved and returned; the run is not complete
        raise RunStopped(f"{run_dir}: stopped at step {trainer.step} of {trainer.steps} (a signal); run again to redo it")


def export_text_lm(run_dir: Path, path: Path) -> Path:
    """The run's last checkpoint with its text rows only: an open_lm checkpoint of a text LM (`init.mode=pretrained`
    extends it with new image and special rows)."""
    from t2i_ds.inference import checkpoint_dir, consolidated_state_dict, run_config
    from t2i_ds.model.checkpoint import save_open_lm, text_rows_only

    vocab = run_config(run_dir).vocab.build()
    save_open_lm(text_rows_only(consolidated_state_dict(checkpoint_dir(run_dir)), vocab), path)
    return path


def scalar_curves(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """tag -> {"steps": [...], "values": [...]} of every scalar in the run's TensorBoard events ({} without events)."""
    from t2i_ds.paper.curves import event_dirs, load_curves

    if not event_dirs(run_dir):
        return {}
    return {tag: {"steps": c.steps.tolist(), "values": c.values.tolist()} for tag, c in load_curves(run_dir).items()}


@dataclass(frozen=True)
class Task:
    """One unit of a resumable sequence: `work(run_dir)` fills run_dir and may return facts for result.json."""

    name: str
    run_dir: Path
    work: Callable[[Path], dict | None]


def is_complete(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).is_file()


def read_result(run_dir: Path) -> dict:
    """{"info": facts the task returned, "curves": its scalar curves, "seconds": its wall time}."""
    return json.loads((run_dir / RESULT_FILE).read_text())


def run_tasks(tasks: list[Task], log: Callable[[str], None] = print, prefix: str = "[runs]") -> None:
    """Run the tasks in order with a progress line each; complete ones are skipped, interrupted ones redone."""
    start = time.monotonic()
    for i, task in enumerate(tasks, 1):
        head = f"{prefix} {i}/{len(tasks)} {task.name}"
        if is_complete(task.run_dir):
            log(f"{head}: complete, skipped")
            continue
        if task.run_dir.exists():  # interrupted: its partial outputs (checkpoints, events) would mix with a new start
            log(f"{head}: removing the interrupted attempt")
            shutil.rmtree(task.run_dir)
        log(f"{head}: running ({time.monotonic() - start:.0f} s into this invocation)")
        t0 = time.monotonic()
        task.run_dir.mkdir(parents=True)
        info = task.work(task.run_dir) or {}
        seconds = time.monotonic() - t0
        result = {"info": info, "curves": scalar_curves(task.run_dir), "seconds": seconds,
                  "load_avg_5min": os.getloadavg()[1]}  # other work on the machine: slower runs under load
        atomic_write_text(task.run_dir / RESULT_FILE, json.dumps(result))
        log(f"{head}: done in {seconds:.0f} s")


def task_seconds(tasks: list[Task]) -> tuple[float, float]:
    """(wall seconds of the completed tasks summed, their mean 5-minute load average): the cost of a sequence that
    may have run over several invocations."""
    done = [read_result(t.run_dir) for t in tasks if is_complete(t.run_dir)]
    if not done:
        return 0.0, float("nan")
    return sum(r["seconds"] for r in done), sum(r["load_avg_5min"] for r in done) / len(done)
