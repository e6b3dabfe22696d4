"""The verdict rule of the replication, fixed before any number was seen (docs/replication.md, "The rule").

Each claim is tested on one measured quantity with one value per seed (usually a paired difference,
e.g. final image loss of the pre-trained run minus that of the random run of the same seed). Over the
n seeds: the mean and its 95% t-interval, mean ± t(0.975, n - 1) · sd / sqrt(n). The claim names a
region of that quantity and a bound b:

    "above b"    holds if the whole interval is > b;      does not hold if the whole interval is <= b
    "below b"    holds if the whole interval is < b;      does not hold if the whole interval is >= b
    "within ±b"  holds if the interval lies inside (-b, b); does not hold if it lies entirely outside [-b, b]

and is inconclusive otherwise (the interval straddles the bound), or with fewer than 2 seeds.
A claim made of parts holds if every part holds, does not hold if any part does not, else is inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
REGIONS = ("above", "below", "within")


@dataclass(frozen=True)
class Interval:
    """Mean and 95% t-interval of n per-seed values (lo = hi = nan when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.3f} (n={self.n}, no interval)"
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}] (n={self.n})"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± t((1 + level) / 2, n - 1) · s / sqrt(n), s the sample standard deviation."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    from scipy.stats import t

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Region:
    """Where the claim puts the measured quantity: above b, below b, or within ±b."""

    kind: str
    bound: float

    def __post_init__(self) -> None:
        if self.kind not in REGIONS:
            raise ValueError(f"Region.kind={self.kind!r} must be one of {REGIONS}")
        if self.kind == "within" and self.bound <= 0:
            raise ValueError(f"a 'within' region needs a bound > 0, got {self.bound}")

    def __str__(self) -> str:
        return f"within ±{self.bound:g}" if self.kind == "within" else f"{self.kind} {self.bound:+g}"

    def verdict(self, ci: Interval) -> str:
        if ci.n < 2:
            return INCONCLUSIVE
        lo, hi, b = ci.lo, ci.hi, self.bound
        if self.kind == "above":
            return HOLDS if lo > b else FAILS if hi <= b else INCONCLUSIVE
        if self.kind == "below":
            return HOLDS if hi < b else FAILS if lo >= b else INCONCLUSIVE
        return HOLDS if -b < lo and hi < b else FAILS if lo > b or hi < -b else INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """Every part holds -> holds; any part does not -> does not hold; else inconclusive."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else INCONCLUSIVE
