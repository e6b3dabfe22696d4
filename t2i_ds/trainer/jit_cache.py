"""DeepSpeed's JIT-built ops (the CPU communication op, CPU Adam) live in this environment's own cache, and a
build lock left by a killed build is reported instead of waited on forever.

torch's `cpp_extension.load` guards a build with `<TORCH_EXTENSIONS_DIR>/<op>/lock` (torch.utils.file_baton):
the building process creates it with O_EXCL and keeps it open until the build ends; every other process
polls until the file disappears, with no timeout and no output. A build killed part-way leaves the file, and
every later start hangs. Before DeepSpeed starts, `check_build_locks` looks at each lock file in the cache: one
that no process on this host holds open was left by a killed build; it is removed with one line, and the op is
built again (ninja redoes the outputs the killed build did not finish: they are not in its log). (On several
nodes sharing the cache a build on another node looks the same from here, so there it is a warning line and the
wait goes on.)

`use_own_cache` points TORCH_EXTENSIONS_DIR at `<sys.prefix>/torch_extensions` when it is unset, so two virtual
environments never rebuild (40-60 s each start) or wait on each other's op; and it makes the builds run this
environment's ninja (the lock's) when it has one: torch runs whichever `ninja` is first on PATH, and two ninja
versions (the venv's 1.13, Debian's 1.11) each discard the other's build log, so an activated and a
non-activated shell rebuilt every op on each switch (1-2 min per start).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
RECHECK_S = 0.5  # a lock seen unheld is looked at again after this long before it is called stale


def use_own_cache() -> str:
    """Set TORCH_EXTENSIONS_DIR to this environment's cache unless the user chose one, and put this environment's
    ninja first on PATH when it has one; returns the cache directory."""
    bin_dir = os.path.dirname(sys.executable)  # <venv>/bin: where pip put the lock's ninja
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return os.environ.setdefault(ENV, os.path.join(sys.prefix, "torch_extensions"))


def build_locks(root: str | Path) -> list[Path]:
    """Lock files of builds under `root` (`<op>/lock`, or `<pyXY_cpu>/<op>/lock` in torch's default layout)."""
    root = Path(root)
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file())


def _holders(paths: list[Path]) -> set[Path]:
    """Those of `paths` some process on this host has open (/proc/<pid>/fd links), as resolved paths."""
    wanted = {os.path.realpath(p) for p in paths}
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in wanted:
                held.add(Path(target))
    return held


def _single_node() -> bool:
    """True unless the launcher says the job spans several nodes (DeepSpeed: CROSS_SIZE; torchrun: sizes)."""
    if int(os.environ.get("CROSS_SIZE", "1")) > 1:
        return False
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return not (world and local and int(world) > int(local))


def check_build_locks(warn=print) -> list[Path]:
    """Remove the build locks in the cache that no live process holds, one line each; returns them.

    Only the first process of each node removes (LOCAL_RANK 0, or a process outside a launcher); its other
    processes leave the file to it, and torch's wait ends as soon as it is gone. A lock is removed only if it is
    the file found stale (same inode, still unheld, looked at again just before): a build that started meanwhile
    created a new one. On several nodes sharing the cache a build elsewhere looks the same from here: a warning,
    nothing removed.
    """
    root = os.environ.get(ENV)
    if not root or not os.path.isdir(root) or not os.path.isdir("/proc"):
        return []
    locks = build_locks(root)
    if not locks:
        return []
    found = {p: _inode(p) for p in locks}
    held = _holders(locks)
    stale = [p for p in locks if Path(os.path.realpath(p)) not in held]
    if stale:  # look again: a build that ended between the listing and the scan (torch closes the lock, then
        time.sleep(RECHECK_S)  # removes it), as another rank of this launch loads its op, is no stale lock
        stale = [p for p in stale if p.is_file() and Path(os.path.realpath(p)) not in _holders([p])]
    if not _single_node():
        for p in stale:
            warn(f"[t2i_ds] warning: {p} is a JIT build lock that no process on this node holds: a build on another "
                 f"node of this job, or one killed part-way (then remove it: rm {p}); waiting for it")
        return []
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return []
    removed = []
    for p in stale:
        if _inode(p) is None or _inode(p) != found[p] or Path(os.path.realpath(p)) in _holders([p]):
            continue  # gone, or a new build's lock meanwhile
        Path(p).unlink(missing_ok=True)
        removed.append(p)
        warn(f"[t2i_ds] removed {p}: a JIT build lock that no process holds (a build killed part-way left it); "
             "the op is built again now instead of waited on")
    return removed


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
