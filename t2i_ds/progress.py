"""Progress of long work (prepare, alignment, FID features, generation), on rank 0 only.

On a terminal: a tqdm bar with count, rate and ETA. When stderr is not a terminal (a log file, a batch
job): one plain line every `every_pct` percent (and at the end), so a log stays short and greppable:

    prepare: 350/1000 images (35%) | 41.2 images/s | elapsed 0:00:08 | ETA 0:00:15

With an unknown total, the plain mode writes a line every `every_s` seconds instead. Other ranks get a
no-op, so callers never branch on the rank.

    with Progress(total=len(units), desc="prepare", unit="shards") as bar:
        for unit in units:
            ...
            bar.update(1)
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


def default_rank() -> int:
    """This process's rank: torch.distributed when initialised, else env RANK (torchrun, deepspeed), else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """A progress display for `total` units of work (see the module docstring).

    total: units expected (None: unknown). desc: the prefix of every line. unit: what is counted.
    rank: this process's rank (default `default_rank()`); only rank 0 shows anything.
    stream: where to write (default sys.stderr). tty: force the mode (default: `stream.isatty()`).
    every_pct / every_s: cadence of the plain lines for a known / unknown total.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        rank: int | None = None,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        every_pct: float = 5.0,
        every_s: float = 60.0,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.enabled = (default_rank() if rank is None else rank) == 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_pct, self.every_s = every_pct, every_s
        self._t0 = self._last_t = time.perf_counter()
        self._initial = initial
        self._next_pct = every_pct
        self._bar = None
        self._closed = False
        self.postfix = ""
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, initial=initial,
                             dynamic_ncols=True, smoothing=0.1)

    # ---- counting ------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.total:
            pct = 100.0 * self.n / self.total
            if pct >= self._next_pct and self.n < self.total:
                self._line(now)
                while self._next_pct <= pct:
                    self._next_pct += self.every_pct
        elif now - self._last_t >= self.every_s:
            self._line(now)

    def set_postfix(self, text: str) -> None:
        """Extra status shown after the counts (e.g. "1200 images, 41.0 images/s"), from the next update on."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """The final line (plain mode) or the finished bar; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(time.perf_counter())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plain lines ---------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The plain status line: count, percent, rate, elapsed and ETA (the last two when computable)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._t0
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
                 if self.total else f"{self.desc}: {self.n} {self.unit}"]
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        self._last_t = now
        print(self.line(now), file=self.stream, flush=True)


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> Iterator[T]:
    """Iterate `iterable` while showing a `Progress` (total from len() when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)
