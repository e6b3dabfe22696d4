"""Checkpoints through DeepSpeed's engine that prove themselves: complete-or-invisible, verified on resume.

Layout under `run_dir/checkpoints/`:

    step_00001000/            DeepSpeed's files (model + ZeRO optimizer partitions, client state)
    step_00001000/rank_00000.pt   per-rank state: data position and RNG states
    step_00001000/COMPLETE    written last, atomically, by rank 0 once every rank saved: JSON with the step,
                              world size, run id and the manifest (every file's size and a sampled CRC32)

A directory without COMPLETE (a crash or a kill while writing) is never picked by `resume`. On resume the
manifest is checked (`verify`): a missing, truncated or altered file names itself, and `train.resume=auto`
falls back to the previous complete checkpoint with one warning line (an explicit path never falls back); the
training that resumes moves the damaged one aside to `damaged-step_...` (`move_aside`: kept for inspection,
with the reason in its DAMAGED file, never listed, resumed, exported or counted by `keep_last` again).
The checksum is CRC32 over three 64 KiB windows (start, middle, end) plus the size: O(1) per file, so a
resume of a 1B run (tens of GB of optimizer state) does not read everything on every rank; truncation and
missing files, the common damage, are always caught by the size.

A save that fails on any rank (disk full, quota, I/O error) raises `CheckpointError` on every rank with the OS
error and the file, after rank 0 removed the partial tag directory; earlier checkpoints are untouched. The
trainer then stops (it does not retry): free space and resume. Only the newest `keep_last` complete
checkpoints of this run (its run id) are kept.

Another number of ranks. ZeRO partitions the optimizer state by data-parallel rank, so a checkpoint saved
by W ranks does not load on W' ranks (DeepSpeed's ZeRORuntimeException). `plan_for` notices it (the
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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from t2i_ds.atomic import atomic_write_text
from t2i_ds.model.checkpoint import atomic_save

MARKER = "COMPLETE"
WINDOW = 64 * 1024  # bytes per checksum window
Agree = Callable[[BaseException | None], None]  # t2i_ds.trainer.agree.Agreement: all ranks fail together


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or resumed, reported as one line naming the file and the reason."""

    user_error = True


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: str | Path) -> bool:
    """True when the checkpoint directory's COMPLETE marker exists (written last, after every rank saved)."""
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict:
    """The COMPLETE marker's JSON ({} for an unreadable one: `verify` reports it)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def complete_checkpoints(root: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoint directories, oldest first; with `run_id`, only those that run wrote."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.glob("step_*") if is_complete(p))
    return [p for p in found if run_id is None or read_marker(p).get("run_id") == run_id]


# ---- manifest ----------------------------------------------------------------------------------
def digest(path: Path) -> dict:
    """{"size", "crc32"}: the size and a CRC32 over the first, middle and last WINDOW bytes."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - WINDOW // 2), max(0, size - WINDOW)}):
            f.seek(offset)
            crc = zlib.crc32(f.read(WINDOW), crc)
    return {"size": size, "crc32": f"{crc:08x}"}


def manifest(tag_dir: Path) -> dict[str, dict]:
    """Every file of the checkpoint directory (relative path -> digest), the marker excluded."""
    return {str(p.relative_to(tag_dir)): digest(p) for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(".")}


def verify(tag_dir: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it (naming the file)."""
    marker = read_marker(tag_dir)
    if not marker:
        return f"{tag_dir / MARKER} is unreadable"
    world = int(marker.get("world_size", 1))
    files = marker.get("files")
    if files is None:  # a marker without a manifest (older checkpoints): at least every rank file must exist
        missing = [rank_file(r) for r in range(world) if not (tag_dir / rank_file(r)).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name in [rank_file(r) for r in range(world) if rank_file(r) not in files]:
        return f"{name} is not in the manifest"
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        got = digest(path)
        if got["size"] != want["size"]:
            return f"{name} has {got['size']} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if got["crc32"] != want["crc32"]:
            return f"{name} fails its checksum (content changed since the save)"
    return None


# ---- choosing the checkpoint to resume -----------------------------------------------------------
def choose_resume(resume: str, root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint to resume, the damaged newer ones with what is wrong with each), without a word or a write.

    'never' -> None; 'auto' -> the newest complete checkpoint that verifies, None when there is none at all; a
    path -> that checkpoint, which must verify. Raises CheckpointError (one line) when checkpoints exist but none
    is intact, or the given path is not. Every rank calls this before DeepSpeed starts; the choice is
    deterministic, so the ranks agree.
    """
    if resume == "never":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"train.resume={resume}: {problem}")
        return path, []
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint to resume under {root}: "
                              f"{'; '.join(f'{p.name} is damaged ({why})' for p, why in damaged)}; "
                              "start again with train.resume=never in another train.run_dir")
    return None, []


def find_resume(resume: str, root: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """`choose_resume` for readers (generate, export): the damaged newer checkpoints named in one warning line,
    left where they are (a reader writes nothing; the next training moves them aside)."""
    path, damaged = choose_resume(resume, root)
    if damaged:
        warn(f"warning: {'; '.join(f'{p.name} is damaged ({why})' for p, why in damaged)}: "
             f"resuming from the previous complete checkpoint {path.name}")
    return path


DAMAGED = "DAMAGED"  # inside a moved-aside checkpoint: why it was moved


def damaged_name(tag: str) -> str:
    """Where a damaged checkpoint goes: `damaged-step_...`, outside the `step_*` names every lister reads."""
    return f"damaged-{tag}"


def move_aside(path: Path, problem: str) -> Path:
    """Rename damaged checkpoint `path` to `damaged-<tag>` beside it (one atomic rename: no lister, keep_last,
    resume or export takes it for a checkpoint again), with the reason in its DAMAGED file; returns the new path.
    Only the run directory's lock holder calls this. A name already taken gets a numeric suffix."""
    target = path.with_name(damaged_name(path.name))
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{damaged_name(path.name)}.{n}")
    os.replace(path, target)
    atomic_write_text(target / DAMAGED, json.dumps({"checkpoint": path.name, "problem": problem, "time": time.time()}) + "\n")
    return target


# ---- per-rank state ------------------------------------------------------------------------------
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


# ---- saving --------------------------------------------------------------------------------------
def _os_error(exc: BaseException, path: str) -> BaseException:
    """The OS error behind a failed write: torch's writer reports ENOSPC as "unexpected pos ..." or
    "write(): fd N failed", so look along the exception chain, then probe the directory with a small write
    that fails the same way while the filesystem is full (or read-only, or over quota)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    probe = Path(path).with_name(f".{Path(path).name}.probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        probe.unlink(missing_ok=True)
    return exc


class _WriteGuard:
    """Around `engine.save_checkpoint`: a write that fails on this rank is recorded instead of raised, so DeepSpeed
    still reaches its barriers on every rank; later writes of this save are skipped. `error` names the file."""

    def __init__(self, engine):
        self.engine, self.error = engine, None
        self._patched = [(engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
                         (engine, "_copy_recovery_script")]

    def record(self, exc: BaseException, path: str) -> None:
        if self.error is None:
            err = _os_error(exc, path)
            reason = f"[Errno {err.errno}] {err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
            self.error = CheckpointError(f"{path}: {reason}")

    def _wrap(self, fn, path_of):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any failed write: recorded, reported by every rank)
                self.record(e, str(path_of(*args, **kwargs)))
                return None
        return guarded

    def __enter__(self) -> "_WriteGuard":
        ce, engine = self.engine.checkpoint_engine, self.engine
        ce.save = self._wrap(ce.save, lambda state_dict, path, *a, **k: path)
        ce.makedirs = self._wrap(ce.makedirs, lambda path, *a, **k: path)
        engine._copy_recovery_script = self._wrap(engine._copy_recovery_script, lambda save_path: save_path)
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in self._patched:
            vars(obj).pop(name, None)  # back to the class's method


def _write_marker(tag_dir: Path, step: int, world: int, run_id: str) -> None:
    files = manifest(tag_dir)
    missing = [rank_file(r) for r in range(world) if rank_file(r) not in files]
    if missing:
        raise CheckpointError(f"{tag_dir / missing[0]} was not written")
    marker = {"step": step, "time": time.time(), "world_size": world, "run_id": run_id, "files": files}
    atomic_write_text(tag_dir / MARKER, json.dumps(marker, indent=1))


def save(engine, root: str | Path, step: int, client_state: dict, rank_state: dict, keep_last: int,
         rank: int, world: int, run_id: str, agree: Agree) -> Path:
    """Save a checkpoint on every rank; returns its directory once it is complete (verified by its manifest).

    Every rank makes the same sequence of `agree` calls, so a failed write anywhere raises CheckpointError on
    every rank (marked `agreed`), naming the file and the OS error, after rank 0 removed the partial directory.
    """
    root = Path(root)
    tag_dir = root / tag_for(step)
    owner = read_marker(tag_dir).get("run_id", run_id) if is_complete(tag_dir) else run_id
    if owner != run_id:  # the same on every rank: never overwrite another run's checkpoint
        err = CheckpointError(f"{tag_dir} is a complete checkpoint of another run ({owner}): not overwriting it")
        err.agreed = True
        raise err
    if rank == 0 and tag_dir.exists():  # a partial (or damaged) save of this step: start clean
        shutil.rmtree(tag_dir, ignore_errors=True)
    agree(None)  # nobody writes into the directory before it is clean
    with _WriteGuard(engine) as guard:
        engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state, save_latest=False)
        if guard.error is None:
            file = tag_dir / rank_file(rank)
            guard._wrap(atomic_save, lambda *a: file)({**rank_state, "rng": rng_state()}, file)
    try:
        agree(guard.error)  # every rank's files are on disk before the marker
        marker_error = None
        if rank == 0:
            try:
                _write_marker(tag_dir, step, world, run_id)
            except OSError as e:
                marker_error = CheckpointError(f"{tag_dir / MARKER}: [Errno {e.errno}] {e.strerror}")
            except CheckpointError as e:
                marker_error = e
        agree(marker_error)
    except Exception as e:  # noqa: BLE001  (raised on every rank by the agreement)
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        kept = complete_checkpoints(root, run_id)
        newest = f"the newest complete checkpoint is {kept[-1]}" if kept else "there is no complete checkpoint yet"
        err = CheckpointError(f"checkpoint {tag_dir.name} not saved: {e}; removed the partial directory; {newest}")
        err.agreed = True  # every rank raises it: rank 0 reports it
        raise err from e
    if rank == 0:
        for old in complete_checkpoints(root, run_id)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return tag_dir


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


def plan_for(path: Path | None, world: int, rank: int, agree: Agree) -> ResumePlan | None:
    """How to load checkpoint `path` (chosen and verified by `find_resume`): as saved, or converted to a universal
    checkpoint first when it was saved at another data-parallel size. Collective: every rank calls it (rank 0
    converts, a failure there ends every rank)."""
    if path is None:
        return None
    saved = saved_world_size(path)
    if saved is None or saved == world:
        return ResumePlan(path, saved, universal=False)
    to_universal(path, rank, agree)
    return ResumePlan(path, saved, universal=True)


def to_universal(path: Path, rank: int, agree: Agree) -> Path:
    """`ds_to_universal` of checkpoint `path` into `path/universal` (once: an existing conversion is reused).

    Rank 0 converts in-process (no worker pool: no fork inside a training process; run
    `python -m deepspeed.checkpoint.ds_to_universal` beforehand with more workers for very large checkpoints
    and the trainer uses its output), into a temporary directory renamed when complete; every rank waits.
    """
    out = Path(path) / UNIVERSAL
    error = None
    if rank == 0 and not (out / MARKER).is_file():
        try:
            _convert(Path(path), out)
        except Exception as e:  # noqa: BLE001  (reported by every rank)
            error = CheckpointError(f"converting {path} to a universal checkpoint failed: {type(e).__name__}: {e}")
    agree(error)  # every rank waits for the conversion
    return out


def _convert(path: Path, out: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # t2i_ds models need no tensor-parallel metadata
    ds_to_universal(args)
    (path / "latest_universal").unlink(missing_ok=True)  # written by the converter; tags are explicit here
    atomic_write_text(tmp / MARKER, json.dumps({"source": path.name, "time": time.time()}))
    os.replace(tmp, out)


def engine_config(ds_config: dict, plan: ResumePlan | None) -> dict:
    """The ds_config the engine is built with: `checkpoint.load_universal` when resuming a converted checkpoint."""
    if plan is None or not plan.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load(engine, plan: ResumePlan, rank: int) -> tuple[dict, dict | None]:
    """Load engine state (model, optimizer, scheduler) and this rank's data/RNG state.

    The rank file must exist (a missing one is an error, never a silent reset of the data position and RNG;
    `verify` has checked it against the manifest). At another world size the data position (global, the same
    on every rank) comes from rank 0's file and RNG states are not restored (they belong to ranks that no
    longer exist).
    """
    try:
        _, client_state = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    except Exception as e:  # noqa: BLE001  (a damaged file the sampled checksum missed)
        raise CheckpointError(f"loading {plan.path} failed ({type(e).__name__}: {e}); resume from an earlier "
                              "checkpoint with train.resume=PATH") from e
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {plan.path}")
    state = _read_rank_file(plan.path / rank_file(0 if plan.universal else rank))
    return client_state, {"data": state["data"]} if plan.universal else state


def _read_rank_file(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the data position and RNG state it holds are lost")
    try:
        return torch.load(file, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {e})") from e
