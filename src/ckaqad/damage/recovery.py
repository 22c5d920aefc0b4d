"""The arithmetic of a recovery study: how much of the damage is undone, and whether geometry and
performance move together.

- Recovery fraction of a metric m at an evaluation step: `(m_damaged − m_now) / (m_damaged − m_teacher)`:
  0 for the damaged model, 1 when the teacher's value is reached, negative when training made it worse.
  Undefined (NaN) when the damage did not move the metric (|m_damaged − m_teacher| below `MIN_GAP`).
- Correlation of recovery with CKA over evaluation points: Pearson's r and Spearman's ρ (scipy.stats) with
  a 95% percentile bootstrap interval over points resampled in pairs (`scipy.stats.bootstrap`, fixed
  seed). `verdict` says it in words: weak below |0.3|, moderate to |0.7|, strong above, and whether the
  interval includes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MIN_GAP = 1e-9
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


# The metrics whose recovery is tracked (present in an evaluation row), and the teacher's value of each.
RECOVERY_METRICS = ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "narrow_perplexity")


def teacher_reference(narrow_perplexity: float | None = None) -> dict[str, float]:
    """The teacher's value of each metric against itself (its perplexity comes with every evaluation row)."""
    reference = {"kl_per_token": 0.0, "top1_agreement": 1.0, "mean_cka": 1.0, "min_cka": 1.0}
    if narrow_perplexity is not None:
        reference["narrow_perplexity"] = narrow_perplexity
    return reference


def recovery_curve(rows: Sequence[dict], reference: dict[str, float]) -> list[dict]:
    """Per evaluation row (the first is the damaged model, step 0): `{step, metric: fraction}` for every
    tracked metric the damaged row and the teacher reference both have."""
    if not rows:
        return []
    damaged = rows[0]
    curve = []
    for row in rows:
        teacher = {**reference, "perplexity": row.get("teacher_perplexity", float("nan"))}
        point = {"step": row["step"]}
        for metric in RECOVERY_METRICS:
            if metric in damaged and metric in row and metric in teacher:
                point[metric] = recovery_fraction(damaged[metric], row[metric], teacher[metric])
        curve.append(point)
    return curve


def recovery_fraction(damaged: float, now: float, teacher: float) -> float:
    gap = damaged - teacher
    if not all(map(math.isfinite, (damaged, now, teacher))) or abs(gap) < MIN_GAP:
        return float("nan")
    return (damaged - now) / gap


@dataclass
class Correlation:
    """One correlation with its bootstrap interval (NaN where fewer than 3 points or a constant side)."""

    method: str  # pearson | spearman
    value: float
    low: float
    high: float
    n: int

    @property
    def includes_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)

    def verdict(self) -> str:
        if not math.isfinite(self.value):
            return f"undefined ({self.n} points, or one side constant)"
        size = abs(self.value)
        strength = "weak" if size < 0.3 else "moderate" if size < 0.7 else "strong"
        sign = "positive" if self.value > 0 else "negative"
        interval = ("the 95% interval includes zero: no evidence of a correlation" if self.includes_zero
                    else "the 95% interval excludes zero")
        return f"{strength} {sign} ({self.method} {self.value:+.3f}, 95% CI [{self.low:+.3f}, {self.high:+.3f}], " \
               f"n={self.n}); {interval}"

    def to_dict(self) -> dict:
        return {**asdict(self), "includes_zero": self.includes_zero, "verdict": self.verdict()}


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r along the last axis (NaN where a row of x or y is constant)."""
    xm = x - x.mean(axis=-1, keepdims=True)
    ym = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((xm * xm).sum(-1) * (ym * ym).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xm * ym).sum(-1) / denominator, np.nan)


def _statistic(method: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy import stats

    if method == "spearman":
        x, y = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    return _pearson_rows(x, y)


def correlate(x: Sequence[float], y: Sequence[float], method: str = "pearson", seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> Correlation:
    """`method` correlation of the finite pairs of (x, y), with its 95% percentile bootstrap interval.

    The point value is scipy's `pearsonr` / `spearmanr`. The interval is the percentile bootstrap over
    pairs exactly as `scipy.stats.bootstrap(paired=True, method="percentile")` draws it (one
    `integers(0, n, (resamples, n))` call of the seeded generator, linear quantiles), except that a resample
    in which one side is constant (frequent at the small n of one damage kind) is dropped instead of turning
    the whole interval into NaN. tests/damage/test_recovery_stats.py checks the equality with scipy."""
    from scipy import stats

    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation {method!r}")
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    nan = Correlation(method, float("nan"), float("nan"), float("nan"), n)
    if n < 3:
        return nan
    xs, ys = (np.asarray(v, dtype=np.float64) for v in zip(*pairs, strict=True))
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return nan
    value = float(stats.pearsonr(xs, ys).statistic if method == "pearson" else stats.spearmanr(xs, ys).statistic)
    index = np.random.default_rng(seed).integers(0, n, (resamples, n))
    theta = _statistic(method, xs[index], ys[index])
    alpha = (1 - CONFIDENCE) / 2
    low, high = (float(v) for v in np.nanquantile(theta, [alpha, 1 - alpha]))
    return Correlation(method, value, low, high, n)
