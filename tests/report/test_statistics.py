"""Spread over seeds against numpy and scipy on fixed inputs: mean, sample std, t interval, paired difference,
and the study aggregation built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ckaqad.report.statistics import Summary, format_interval, format_summary, paired_difference, summarize
from ckaqad.report.study import aggregate

VALUES = [0.9712, 0.9655, 0.9781, 0.9698]


def test_summarize_matches_numpy_and_scipy():
    s = summarize(VALUES)
    assert s.n == 4 and s.mean == pytest.approx(np.mean(VALUES)) and s.std == pytest.approx(np.std(VALUES, ddof=1))
    low, high = stats.t.interval(0.95, len(VALUES) - 1, loc=np.mean(VALUES), scale=stats.sem(VALUES))
    assert (s.low, s.high) == pytest.approx((low, high))


def test_paired_difference_is_scipys_paired_t_interval_over_common_seeds():
    a = {0: 0.975, 1: 0.981, 2: 0.969, 3: 0.990}
    b = {0: 0.966, 1: 0.970, 2: 0.968, 7: 0.5}  # seed 3 and 7 are unpaired: left out
    d = paired_difference(a, b)
    ci = stats.ttest_rel([a[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)]).confidence_interval(0.95)
    assert d.n == 3 and d.mean == pytest.approx(np.mean([0.009, 0.011, 0.001]))
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))


def test_small_samples_and_non_finite_values():
    one = summarize([0.5, float("nan")])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.low)
    assert summarize([]).n == 0 and format_summary(summarize([])) == "–"
    assert format_summary(one) == "0.5000" and format_interval(one) == "–"
    assert format_summary(Summary(3, 1.0, 0.25, 0.5, 1.5), 2) == "1.00 ± 0.25"


def test_verdict_reads_the_interval_against_zero():
    assert Summary(3, 0.01, 0.001, 0.005, 0.015).verdict() == "wins"
    assert Summary(3, 0.01, 0.001, 0.005, 0.015).verdict(higher_is_better=False) == "loses"
    assert Summary(3, 0.0, 0.01, -0.02, 0.02).verdict() == "ties"
    assert Summary(1, 0.0, math.nan, math.nan, math.nan).verdict() == "n/a"


def cell(method, seed, mean_cka, kl, layers):
    return {"model": "m", "format": "nvfp4", "scheme": "w4a4", "method": method, "seed": seed, "steps": 10,
            "metrics": {"mean_cka": mean_cka, "kl_per_token": kl},
            "layers": [{"index": i, "cka": v} for i, v in enumerate(layers)]}


def test_aggregate_groups_over_seeds_and_pairs_per_seed():
    cells = [cell("kl", 0, 0.96, 0.30, [0.97, 0.95]), cell("kl", 1, 0.95, 0.32, [0.96, 0.94]),
             cell("kl", 2, 0.97, 0.31, [0.98, 0.96]),
             cell("kl+cka", 0, 0.975, 0.31, [0.98, 0.97]), cell("kl+cka", 1, 0.97, 0.33, [0.975, 0.965]),
             cell("kl+cka", 2, 0.98, 0.30, [0.99, 0.97])]
    result = aggregate(cells)
    groups = {g["method"]: g for g in result["groups"]}
    assert groups["kl"]["seeds"] == [0, 1, 2]
    assert groups["kl"]["metrics"]["mean_cka"]["mean"] == pytest.approx(0.96)
    assert groups["kl"]["metrics"]["kl_per_token"]["std"] == pytest.approx(np.std([0.30, 0.32, 0.31], ddof=1))
    layer1 = groups["kl+cka"]["layers"][1]
    low, high = stats.t.interval(0.95, 2, loc=np.mean([0.97, 0.965, 0.97]), scale=stats.sem([0.97, 0.965, 0.97]))
    assert (layer1["low"], layer1["high"]) == pytest.approx((low, high))
    (paired,) = result["paired"]
    assert (paired["a"], paired["b"], paired["seeds"]) == ("kl+cka", "kl", [0, 1, 2])
    diff = paired["metrics"]["mean_cka"]
    ci = stats.ttest_rel([0.975, 0.97, 0.98], [0.96, 0.95, 0.97]).confidence_interval(0.95)
    assert diff["mean"] == pytest.approx(0.015) and (diff["low"], diff["high"]) == pytest.approx((ci.low, ci.high))
    assert diff["verdict"] == "wins"
    assert paired["metrics"]["kl_per_token"]["verdict"] == "ties"
