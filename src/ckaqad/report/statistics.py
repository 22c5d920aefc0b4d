"""Spread over seeds: mean, sample standard deviation and Student-t 95% interval of a metric, and the paired
per-seed difference of two methods (the interval of the mean difference, which is what says whether one
method beats the other at this number of seeds). scipy supplies the t quantile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """n values: mean, sample std (ddof 1; NaN for n < 2) and the t interval of the mean (NaN for n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self, higher_is_better: bool = True) -> str:
        """For a difference A − B: `wins` (A better: the interval excludes 0 on A's side), `loses`, `ties`."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "n/a"
        if self.low > 0:
            return "wins" if higher_is_better else "loses"
        if self.high < 0:
            return "loses" if higher_is_better else "wins"
        return "ties"


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile with n − 1 degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of the finite `values` (non-finite ones are dropped; none left: every field NaN, n 0)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n, confidence) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of a[seed] − b[seed] over the seeds both have (the paired t interval)."""
    seeds = sorted(set(a) & set(b))
    return summarize([a[s] - b[s] for s in seeds], confidence)


def format_summary(s: Summary, digits: int = 4) -> str:
    """`mean ± std` (just the mean for n = 1, `–` for n = 0)."""
    if s.n == 0:
        return "–"
    if s.n == 1:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def format_interval(s: Summary, digits: int = 4) -> str:
    """`[low, high]` (`–` when undefined)."""
    if not (math.isfinite(s.low) and math.isfinite(s.high)):
        return "–"
    return f"[{s.low:+.{digits}f}, {s.high:+.{digits}f}]"
