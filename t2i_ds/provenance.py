"""Where a result came from: the git revision stamped on run directories, reports and benchmark rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """HEAD of the repository holding this package, '-dirty' when tracked files differ; 'unknown' outside git.

    $T2I_GIT_REVISION, when set, wins: benchmarks/gpu_job.sh sets it from a stamp written before the tree was copied
    to the GPU machine, whose copy has no .git.
    """
    if os.environ.get("T2I_GIT_REVISION"):
        return os.environ["T2I_GIT_REVISION"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
