"""The study's arithmetic: recovery fractions, and correlations with bootstrap intervals that agree with
scipy's (same draws, same percentiles) on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ckaqad.damage.recovery import correlate, recovery_curve, recovery_fraction, teacher_reference

# Fixed data: 24 points, recovery rising with CKA plus noise.
CKA = np.linspace(0.80, 0.99, 24)
RECOVERY = (CKA - 0.8) * 4 + np.sin(np.arange(24) * 1.7) * 0.15


def test_recovery_fraction():
    assert recovery_fraction(2.0, 2.0, 0.0) == 0.0
    assert recovery_fraction(2.0, 0.0, 0.0) == 1.0
    assert recovery_fraction(2.0, 1.5, 0.0) == 0.25
    assert recovery_fraction(10.0, 12.0, 6.0) == -0.5  # worse than damaged
    assert recovery_fraction(0.5, 0.8, 1.0) == pytest.approx(0.6)  # a metric that rises (top-1): same formula
    assert math.isnan(recovery_fraction(1.0, 1.0, 1.0))


def test_recovery_curve_uses_step_zero_and_each_rows_teacher_ppl():
    rows = [{"step": 0, "kl_per_token": 1.0, "perplexity": 20.0, "teacher_perplexity": 10.0, "top1_agreement": 0.5,
             "mean_cka": 0.9},
            {"step": 5, "kl_per_token": 0.5, "perplexity": 15.0, "teacher_perplexity": 10.0, "top1_agreement": 0.75,
             "mean_cka": 0.95}]
    curve = recovery_curve(rows, teacher_reference())
    assert curve[0]["kl_per_token"] == 0
    assert curve[1] == pytest.approx({"step": 5, "kl_per_token": 0.5, "perplexity": 0.5, "top1_agreement": 0.5,
                                      "mean_cka": 0.5})


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_and_interval_agree_with_scipy(method):
    result = correlate(CKA, RECOVERY, method, seed=7)
    scipy_value = (stats.pearsonr if method == "pearson" else stats.spearmanr)(CKA, RECOVERY).statistic
    assert result.value == pytest.approx(scipy_value, abs=1e-12)
    if method == "pearson":
        assert result.value == pytest.approx(np.corrcoef(CKA, RECOVERY)[0, 1], abs=1e-12)

    def statistic(x, y, axis=-1):
        if method == "pearson":
            return stats.pearsonr(x, y, axis=axis).statistic
        return np.array([stats.spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)]) if x.ndim > 1 \
            else stats.spearmanr(x, y).statistic

    reference = stats.bootstrap((CKA, RECOVERY), statistic, paired=True, vectorized=True, n_resamples=2000,
                                method="percentile", rng=np.random.default_rng(7)).confidence_interval
    assert result.low == pytest.approx(reference.low, abs=1e-10)
    assert result.high == pytest.approx(reference.high, abs=1e-10)
    assert result.low < result.value < result.high and not result.includes_zero
    assert result.verdict().startswith("strong positive") and "excludes zero" in result.verdict()


def test_weak_correlation_is_said_plainly():
    noise = np.cos(np.arange(24) * 2.3)
    result = correlate(CKA, noise, "pearson", seed=0)
    assert abs(result.value) < 0.3 and result.includes_zero
    assert result.verdict().startswith("weak") and "includes zero" in result.verdict()


def test_small_and_degenerate_inputs():
    few = correlate([0.1, 0.2, 0.3, 0.4], [0.0, 0.4, 0.3, 0.9])
    assert math.isfinite(few.low) and math.isfinite(few.high)  # degenerate resamples are dropped, not NaN
    assert math.isnan(correlate([1, 2], [3, 4]).value)
    constant = correlate([1, 2, 3, 4], [1, 1, 1, 1])
    assert math.isnan(constant.value) and "undefined" in constant.verdict()
    with_nan = correlate([1, 2, 3, float("nan"), 5], [1, 2, 2.5, 4, 6])
    assert with_nan.n == 4
