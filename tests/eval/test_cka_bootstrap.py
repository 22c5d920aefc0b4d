"""The bootstrap interval of a layer's CKA over sequences, the massive-activation check and the robust token
selection: the resample formula against linear_cka on the resampled rows, the all-ones resample against the
streaming accumulator, the interval against the full-data CKA, and measure_fidelity on the tiny models."""

from __future__ import annotations

import pytest
import torch

from ckaqad.cka import CKAAccumulator, linear_cka
from ckaqad.eval.cka_bootstrap import SequenceFeatures, bootstrap_interval, resample_weights, weighted_cka
from ckaqad.eval.fidelity import MASSIVE_DOMINANT_SHARE, measure_fidelity

pytestmark = pytest.mark.usefixtures("one_thread")


def paired_sequences(n_seq=12, tokens=20, d=16, noise=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n_seq, tokens, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    y = y + torch.randn(n_seq, 1, d, generator=gen)  # per-sequence offsets: tokens of a sequence are correlated
    x = y @ torch.randn(d, d, generator=gen) * 0.3 + y + noise * torch.randn(n_seq, tokens, d, generator=gen)
    return x, y


def features(x, y, dtype=torch.float64):
    fx, fy = SequenceFeatures(dtype), SequenceFeatures(dtype)
    for s in range(x.shape[0]):
        ids = torch.full((x.shape[1],), s)
        fx.add(x[s], ids)
        fy.add(y[s], ids)
    return fx, fy


def test_a_resample_is_linear_cka_of_the_resampled_rows():
    x, y = paired_sequences()
    fx, fy = features(x, y)
    xm, xs = fx.matrix()
    ym, ys = fy.matrix()
    weights = resample_weights(x.shape[0], 5, seed=3)
    values = weighted_cka(xm, xs, ym, ys, weights)
    for w, value in zip(weights, values, strict=True):
        chosen = [s for s in range(x.shape[0]) for _ in range(int(w[s]))]
        direct = linear_cka(torch.cat([x[s] for s in chosen]).double(), torch.cat([y[s] for s in chosen]).double())
        assert float(value) == pytest.approx(float(direct), abs=1e-10)
    assert torch.all(weights.sum(1) == x.shape[0])


def test_the_all_ones_resample_is_the_accumulators_full_data_cka():
    x, y = paired_sequences(seed=1)
    acc = CKAAccumulator()
    for s in range(0, x.shape[0], 3):  # batches of 3 sequences, as measure_fidelity feeds it
        acc.update(x[s:s + 3].reshape(-1, x.shape[2]), y[s:s + 3].reshape(-1, y.shape[2]))
    exact = bootstrap_interval(*features(x, y), resamples=10)
    assert exact["cka"] == pytest.approx(acc.biased(), abs=1e-10)
    stored = bootstrap_interval(*features(x, y, torch.float16), resamples=10)  # the default, compact storage
    assert stored["cka"] == pytest.approx(acc.biased(), abs=1e-5)


def test_the_interval_covers_the_full_data_cka_and_narrows_with_more_sequences():
    widths = []
    for n_seq in (8, 64):
        x, y = paired_sequences(n_seq=n_seq, seed=2)
        r = bootstrap_interval(*features(x, y), resamples=400)
        assert r["low"] < r["cka"] < r["high"] and r["sequences"] == n_seq and r["std"] > 0
        widths.append(r["high"] - r["low"])
    assert widths[1] < widths[0] / 1.8  # ~ 1/sqrt(n): 8x the sequences, ~2.8x narrower


def test_the_interval_covers_the_population_cka_in_repeated_samples():
    """Sequences drawn from one process: the population CKA (from 3000 sequences) lies inside the interval of a
    32-sequence sample in at least 80% of 40 samples (nominal 95%; 88% measured over 60, the shortfall is the
    estimator's small-sample bias). A standard error off by sqrt(32) would cover almost never."""
    x, y = paired_sequences(n_seq=3000, tokens=20, seed=5)
    population = float(linear_cka(x.reshape(-1, x.shape[2]).double(), y.reshape(-1, y.shape[2]).double()))
    covered = 0
    for trial in range(40):
        r = bootstrap_interval(*features(x[trial * 32:(trial + 1) * 32], y[trial * 32:(trial + 1) * 32]),
                               resamples=300, seed=trial)
        covered += r["low"] <= population <= r["high"]
    assert covered >= 32


def test_one_sequence_has_no_interval():
    x, y = paired_sequences(n_seq=1)
    r = bootstrap_interval(*features(x, y), resamples=50)
    assert r["resamples"] == 0 and r["low"] != r["low"]  # NaN


def batches(n=3, batch=2, seq=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (batch, seq), generator=gen)} for _ in range(n)]


def test_measure_fidelity_reports_covering_intervals_and_massive_shares(tiny_model):
    from conftest import make_tiny_model

    student = make_tiny_model(seed=0)  # the teacher with noisy weights: CKA near 1, as for a quantized student
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    results, teacher = measure_fidelity(tiny_model, {"s": student}, batches(n=4), progress=False, bootstrap=300)
    plain, _ = measure_fidelity(tiny_model, {"s": student}, batches(n=4), progress=False)
    for row, ref in zip(results["s"].layers, plain["s"].layers, strict=True):
        assert row["cka"] == ref["cka"]  # the intervals leave the point estimate alone
        assert row["cka_low"] <= row["cka"] <= row["cka_high"] and row["sequences"] == 8
    rows = teacher["massive"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["tokens"] == 8 * 23 and 0 < r["top1_share"] <= r["top_share"] < 1 for r in rows)


def test_a_planted_massive_token_dominates_and_the_robust_selection_drops_it(tiny_model):
    from conftest import make_tiny_model

    layer = tiny_model.model.layers[1]

    def plant(module, args, output):  # one token per batch (3 of 138) with a huge residual-stream value
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 5, 3] += 1e4
        return output

    handle = layer.register_forward_hook(plant)
    try:
        student = make_tiny_model(seed=1)
        _, teacher = measure_fidelity(tiny_model, {"s": student}, batches(), progress=False)
        robust, teacher_r = measure_fidelity(tiny_model, {"s": student}, batches(), progress=False, massive_factor=10)
    finally:
        handle.remove()
    by_layer = {r["layer"]: r for r in teacher["massive"]}
    assert by_layer[1]["top_share"] > 0.5 and by_layer[0]["top_share"] < MASSIVE_DOMINANT_SHARE
    assert teacher["massive_summary"]["dominated_layers"] == [1]
    tokens = {row["index"]: row["tokens"] for row in robust["s"].layers}
    assert tokens[1] == 6 * 23 - 3 and tokens[0] == 6 * 23  # the planted tokens left out, only where planted
    assert teacher_r["massive_factor"] == 10
