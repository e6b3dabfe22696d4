"""One run per directory: the lock, the run id, and the checks a resume makes before anything is written.

* `run_dir/LOCK` holds the holder's host, pid and start time while a training writes there. It is an advisory
  `flock`: the kernel releases it when the holder dies, so a lock left by a killed run is stale by construction
  (detected, taken over, and said so: what the file named, and whether that pid is dead, alive but not holding
  the lock (a reused pid, a copied directory), on another host, or this process). A second training into a live
  run directory is refused with one line.
* `run_dir/run.json` holds the run id, written at the first start and kept by every resume; checkpoint markers
  record it, and `keep_last` only ever prunes this run's checkpoints.
* A resume first compares the new config with the run's `config.json`: fields that change shapes (vocab,
  model architecture, freezing) or that the checkpoint would silently override (optimizer hyper-parameters
  restored with the optimizer state, init.* which a resume never reads) must match, else one line names them;
  other differences (steps, logging cadence, data) are allowed and logged. Nothing is written before this check.
* `metrics.jsonl` (and the sample-id records of `train.record_samples`) keep each step once: rows after the
  resumed step (written after that checkpoint by the interrupted invocation) are dropped on resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from t2i_ds.atomic import atomic_write_text

LOCK = "LOCK"
RUN_FILE = "run.json"
# Fields a resume must keep (dotted; a section name means all of it). model.overrides keys that only pick
# kernels (attn_backend, loss_impl) may change.
FIXED_ON_RESUME = ("vocab", "model.preset", "model.overrides", "init", "optim.lr", "optim.betas", "optim.eps",
                   "optim.weight_decay", "train.freeze")
KERNEL_CHOICES = ("attn_backend", "loss_impl")


class NothingToDo(Exception):
    """The checkpoint to resume is at or past train.steps: said in one line, exit status 0, nothing written."""


class RunDirBusy(RuntimeError):
    """Another live training holds the run directory."""

    user_error = True


# ---- the lock ----------------------------------------------------------------------------------
def _holder_text(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock(fd: int, path: Path) -> bool:
    """Try the exclusive lock; False when a live process holds it. Filesystems without flock fall back to pids."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno != errno.ENOLCK:
            raise
        info = _read(path)
        pid = int(info.get("pid", -1))
        return not (info.get("host") == socket.gethostname() and pid != os.getpid() and _pid_alive(pid))


def check_not_busy(run_dir: Path) -> None:
    """Raise RunDirBusy when a live training holds `run_dir` (a probe: takes and releases the lock at once)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _flock(fd, path):
            raise RunDirBusy(f"{run_dir} is in use by another training, {_holder_text(_read(path))}: wait for it to "
                             f"end or choose another train.run_dir (the lock is {path})")
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _takeover_text(old: dict, path: Path) -> str:
    """What was found in a lock file whose flock nobody held (we hold it now), in one line."""
    pid, host = old.get("pid"), old.get("host")
    found = f"{path} named {_holder_text(old)}"
    if host != socket.gethostname():
        why = ("which cannot be checked from here and holds no lock on it (a run there that ended, or a run directory "
               "copied from there)")
    elif pid == os.getpid():
        why = "which is this process (a lock it left itself)"
    elif isinstance(pid, int) and _pid_alive(pid):
        why = ("which is alive but does not hold the lock, so it is not a training of this directory (its pid reused "
               "after a reboot, or a run directory copied from a live run)")
    else:
        why = "which is no longer alive (a training that was killed)"
    return f"took over the run directory's lock: {found}, {why}"


class RunLock:
    """Held by rank 0 for the life of the training; `stale` describes a dead holder's lock that was taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(self.fd, self.path):
            holder = _read(self.path)
            os.close(self.fd)
            raise RunDirBusy(f"{run_dir} is in use by another training, {_holder_text(holder)}: wait for it to "
                             f"end or choose another train.run_dir (the lock is {self.path})")
        old = _read(self.path)
        self.stale = _takeover_text(old, self.path) if old else ""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# ---- the run id --------------------------------------------------------------------------------
def run_id(run_dir: Path) -> str:
    """This run's id from run.json; a new one (not yet written: see `write_run_id`) for a new run."""
    info = _read(Path(run_dir) / RUN_FILE)
    return str(info["run_id"]) if "run_id" in info else uuid.uuid4().hex


def write_run_id(run_dir: Path, rid: str) -> None:
    path = Path(run_dir) / RUN_FILE
    if _read(path).get("run_id") != rid:
        atomic_write_text(path, json.dumps({"run_id": rid, "created": time.time()}) + "\n")


# ---- resume checks ------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model.overrides":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _fixed(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): "key: old -> new" for each difference between the saved and the new config."""
    a, b = _flatten(saved), _flatten(new)
    for d in (a, b):  # kernel choices may change: compare the architecture only
        if isinstance(d.get("model.overrides"), dict):
            d["model.overrides"] = {k: v for k, v in d["model.overrides"].items() if k not in KERNEL_CHOICES}
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (refused if _fixed(key) else allowed).append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return refused, allowed


def check_resume_config(run_dir: Path, new: dict) -> list[str]:
    """Refuse (ConfigError, one line) a resume whose config differs from the run's in a fixed field; returns the
    allowed changes to log. A run directory without config.json has nothing to compare."""
    from t2i_ds.config import ConfigError

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    refused, allowed = config_changes(saved, json.loads(json.dumps(new, default=str)))
    if refused:
        raise ConfigError(f"cannot resume {run_dir} with a different {'; '.join(refused)}: the checkpoint was trained "
                          "with the first values; resume with them, or train into another train.run_dir")
    return allowed


def trim_step_logs(run_dir: Path, step: int) -> int:
    """Drop the rows after `step` (logged after the checkpoint we resume from) from metrics.jsonl and the sample-id
    records samples/rank_*.jsonl, so each step appears once; returns how many metrics rows went."""
    dropped = _trim(Path(run_dir) / "metrics.jsonl", step)
    for path in sorted((Path(run_dir) / "samples").glob("rank_*.jsonl")):
        _trim(path, step)
    return dropped


def _trim(path: Path, step: int) -> int:
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def _step_of(line: str) -> int | None:
    """The step of a metrics row; None for a blank or cut-off line (a kill in the middle of a write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
