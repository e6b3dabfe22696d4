"""Checkpoints through DeepSpeed's engine, complete-or-invisible, with the state to continue a run.

Layout under `run_dir/checkpoints/`:

    step_00001000/            DeepSpeed's files (model + ZeRO optimizer partitions, client state)
    step_00001000/rank_00000.pt   per-rank state: data position and RNG states
    step_00001000/COMPLETE    written last, atomically, by rank 0 after a barrier

A directory without COMPLETE (a crash or a kill while writing) is never picked by `resume`.
Only the newest `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from t2i_ds.atomic import atomic_write_text
from t2i_ds.model.checkpoint import atomic_save

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    """True when the checkpoint directory's COMPLETE marker exists (written last, after every rank saved)."""
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if is_complete(p))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, root: str | Path, step: int, client_state: dict, rank_state: dict, keep_last: int, rank: int) -> Path:
    """Save a checkpoint on every rank; returns its directory once it is complete."""
    root = Path(root)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    atomic_save({**rank_state, "rng": rng_state()}, root / tag / f"rank_{rank:05d}.pt")
    _barrier()  # every rank's files are on disk before the marker
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_text(root / tag / MARKER, json.dumps({"step": step, "time": time.time(), "world_size": world}))
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def find_resume(resume: str, root: str | Path) -> Path | None:
    """'auto' -> latest complete checkpoint or None; 'never' -> None; else a path that must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
    return path


def load(engine, path: Path, rank: int) -> tuple[dict, dict | None]:
    """Load engine state (model, optimizer, scheduler) and this rank's data/RNG state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return client_state, rank_state
