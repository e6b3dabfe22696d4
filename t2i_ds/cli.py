"""Command-line entry points: bad input ends with one line naming the problem and exit status 2.

User-facing errors (a missing file, an invalid value, damaged data, a checkpoint that does not fit)
are printed as `prog: error: message`; anything else is a bug and keeps its traceback.
Set T2I_DS_TRACEBACK=1 to see the traceback of user-facing errors too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, subprocess.CalledProcessError)


def run(prog: str, main: Callable[[], object]) -> None:
    """Call `main()` and exit with its integer result (0 for None), or 2 with one line on a user error."""
    from t2i_ds.data.loader import BrokenDataError

    try:
        result = main()
    except (*USER_ERRORS, BrokenDataError) as e:
        if os.environ.get("T2I_DS_TRACEBACK") == "1":
            raise
        message = f"command failed: {' '.join(map(str, e.cmd))}" if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)
