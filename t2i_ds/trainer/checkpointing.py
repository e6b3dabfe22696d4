"""Checkpoints through DeepSpeed's engine, complete-or-invisible, with the state to continue a run.

Layout under `run_dir/checkpoints/`:

    step_00001000/            DeepSpeed's files (model + ZeRO optimizer partitions, client state)
    step_00001000/rank_00000.pt   per-rank state: data position and RNG states
    step_00001000/COMPLETE    written last, atomically, by rank 0 after a barrier

A directory without COMPLETE (a crash or a kill while writing) is never picked by `resume`.
Only the newest `keep_last` complete checkpoints are kept.

Another number of ranks. ZeRO partitions the optimizer state by data-parallel rank, so a checkpoint saved
by W ranks does not load on W' ranks (DeepSpeed's ZeRORuntimeException). `plan_resume` notices it (the
checkpoint's count of ZeRO partition files), converts the checkpoint once with DeepSpeed's universal
checkpoint (`deepspeed.checkpoint.ds_to_universal`, rank 0, into `step_.../universal/`, atomically) and the
engine loads that with `"checkpoint": {"load_universal": true}`: parameters, Adam moments and step counts,
and the LR schedule carry over; the data position is global (the loader's order does not depend on the
world size), so the run continues with the samples an uninterrupted run would have used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
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


# ---- resuming, at the saved or at another data-parallel size ---------------------------------------------
UNIVERSAL = "universal"  # sub-directory of a checkpoint holding its universal conversion


@dataclass(frozen=True)
class ResumePlan:
    """Where to load from: the checkpoint `path`, and what the engine loads (`path/tag` when converted)."""

    path: Path
    saved_world: int | None  # data-parallel ranks that saved it (None: not a ZeRO-partitioned checkpoint)
    universal: bool  # converted to a universal checkpoint because the world size differs

    @property
    def load_dir(self) -> Path:
        return self.path if self.universal else self.path.parent

    @property
    def tag(self) -> str:
        return UNIVERSAL if self.universal else self.path.name


def saved_world_size(path: Path) -> int | None:
    """Data-parallel size a checkpoint was saved at: its ZeRO optimizer partition files (one per rank)."""
    return len(list(Path(path).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def plan_resume(resume: str, root: str | Path, world: int, rank: int) -> ResumePlan | None:
    """The checkpoint to resume (`find_resume`), converted to a universal checkpoint first when it was saved
    at another data-parallel size. Collective: call on every rank (rank 0 converts, the others wait)."""
    path = find_resume(resume, root)
    if path is None:
        return None
    saved = saved_world_size(path)
    if saved is None or saved == world:
        return ResumePlan(path, saved, universal=False)
    to_universal(path, rank)
    return ResumePlan(path, saved, universal=True)


def to_universal(path: Path, rank: int) -> Path:
    """`ds_to_universal` of checkpoint `path` into `path/universal` (once: an existing conversion is reused).

    Rank 0 converts in-process (no worker pool: no fork inside a training process; run
    `python -m deepspeed.checkpoint.ds_to_universal` beforehand with more workers for very large checkpoints
    and the trainer uses its output), into a temporary directory renamed when complete; every rank waits.
    """
    out = Path(path) / UNIVERSAL
    if rank == 0 and not (out / MARKER).is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = Path(path) / f"{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # t2i_ds models need no tensor-parallel metadata
        ds_to_universal(args)
        (Path(path) / "latest_universal").unlink(missing_ok=True)  # written by the converter; tags are explicit here
        atomic_write_text(tmp / MARKER, json.dumps({"source": Path(path).name, "time": time.time()}))
        os.replace(tmp, out)
    _barrier()
    return out


def engine_config(ds_config: dict, plan: ResumePlan | None) -> dict:
    """The ds_config the engine is built with: `checkpoint.load_universal` when resuming a converted checkpoint."""
    if plan is None or not plan.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load(engine, plan: ResumePlan, rank: int) -> tuple[dict, dict | None]:
    """Load engine state (model, optimizer, scheduler) and this rank's data/RNG state.

    At another world size the data position (global, the same on every rank) comes from rank 0's file and
    RNG states are not restored (they belong to ranks that no longer exist).
    """
    _, client_state = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {plan.path}")
    if not plan.universal:
        rank_file = plan.path / f"rank_{rank:05d}.pt"
        return client_state, torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    rank0 = plan.path / "rank_00000.pt"
    return client_state, {"data": torch.load(rank0, weights_only=False)["data"]} if rank0.is_file() else None
