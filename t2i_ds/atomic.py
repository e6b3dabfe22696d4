"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one, never a part.

Every writer of checkpoints, shards, manifests, tokenizers and statistics goes through `atomic_path`:
write to a hidden temporary sibling, fsync, rename over the target (atomic on POSIX); on error the
temporary is removed. The file gets the mode of any file written with `open` (0o666 minus the umask: 0644
under the usual umask 022), also when the writer replaced the temporary with a private file of its own
(safetensors' `save_file` writes 0600).

A writer killed between create and rename (SIGKILL, node failure) leaves its temporary behind. Its name,
`.{name}.{host}.{pid}.{random}.tmp`, tells whose it is: `clean_stale_temporaries` removes those whose writer
on this host is gone, or that are older than a day, and nothing else.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

STALE_AFTER_S = 24 * 3600.0  # a temporary this old is stale even when its writer (on another host) is unknown
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _create_temporary(path: Path) -> Path:
    """Create (O_EXCL) an empty temporary sibling of `path` with the umask applied; return its path."""
    while True:
        tmp = path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        os.close(fd)
        return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what `open` gives, whoever wrote the temporary
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` for writing, made atomic with `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temporary(path: Path, now: float | None = None, max_age_s: float = STALE_AFTER_S) -> bool:
    """True for a temporary of `atomic_path` whose writer is gone: a dead pid on this host, or older than
    `max_age_s` (a writer on another host cannot be asked). Any other file, ours or not, is never stale."""
    m = _TMP_RE.match(path.name)
    if m is None or not path.is_file():
        return False
    if m["host"] == _host() and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:  # renamed or removed meanwhile
        return False
    return age > max_age_s


def clean_stale_temporaries(directory: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the stale `atomic_path` temporaries directly inside `directory`; return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now = time.time()
    removed = []
    for p in sorted(directory.glob(".*.tmp")):
        if is_stale_temporary(p, now, max_age_s):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
