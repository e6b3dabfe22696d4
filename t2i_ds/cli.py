"""Command-line entry points: bad input ends with one line naming the problem and exit status 2.

User-facing errors (a missing file, an invalid value, damaged data, a checkpoint that does not fit, a full
disk) are printed as `prog: error: message`; anything else is a bug and keeps its traceback.
Set T2I_DS_TRACEBACK=1 to see the traceback of user-facing errors too.

Argument types for argparse (`positive_int`, `non_negative_float`, `top_k`, ...) refuse an out-of-range value
with argparse's own one line (`prog: error: argument --cfg_scale: must be >= 0, got -2.0`).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import subprocess
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError, FileExistsError, ValueError,
                                                subprocess.CalledProcessError)
# OS errors of the environment rather than the code: full disk, quota, read-only filesystem, I/O error, ...
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}


def is_user_error(e: BaseException) -> bool:
    """True for errors reported as one line: input/environment problems, and classes marked `user_error = True`."""
    from t2i_ds.data.loader import BrokenDataError

    if isinstance(e, (*USER_ERRORS, BrokenDataError)) or getattr(e, "user_error", False):
        return True
    return isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def message_of(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"command failed: {' '.join(map(str, e.cmd))}"
    return str(e)


def run(prog: str, main: Callable[[], object]) -> None:
    """Call `main()` and exit with its integer result (0 for None), or 2 with one line on a user error."""
    try:
        result = main()
    except Exception as e:
        if not is_user_error(e) or os.environ.get("T2I_DS_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {message_of(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


# ---- argparse types: range checks where the values enter --------------------------------------------------
def _number(text: str, kind: type, rule: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, ">= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, ">= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "> 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, ">= 0", lambda v: v >= 0)


def top_k(text: str) -> int | None:
    """`--top_k`: an integer >= 1, or 'none' (sample from the whole image vocabulary)."""
    if text.lower() == "none":
        return None
    return _number(text, int, ">= 1 or 'none'", lambda v: v >= 1)
