"""The GRPO and ABC-GRPO token objectives against their formulas, element by element, over all four quadrants
of (sign A, r ≶ 1), with their gradients; ABC with GRPO's bounds is GRPO; GRPO's group advantages."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.rl import abc_token_objective, group_advantages, grpo_token_objective
from ckaqad.rl.objectives import QUADRANTS, ClipBounds, clip_statistics

EPS = dict(eps1=0.28, eps2=0.15, eps3=0.1, eps4=0.2)  # four different bounds, so a swapped one shows


def random_inputs(dtype=torch.float64, n=4000, seed=0):
    """Ratios spread over [0.4, 1.6] (inside and outside every bound) and advantages of both signs and 0."""
    g = torch.Generator().manual_seed(seed)
    ratio = (0.4 + 1.2 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    adv[::17] = 0.0
    return ratio, adv


def clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def grpo_direct(r: float, a: float, low: float, high: float) -> tuple[float, float]:
    """(value, d value / d r) of min(r·A, clip(r)·A), written out per element."""
    unclipped, clipped = r * a, clip(r, 1 - low, 1 + high) * a
    value = min(unclipped, clipped)
    bound_active = (a > 0 and r > 1 + high) or (a < 0 and r < 1 - low)
    return value, 0.0 if bound_active else a


def abc_direct(r: float, a: float, eps1, eps2, eps3, eps4) -> tuple[float, float]:
    lo, hi = (1 - eps2, 1 + eps1) if a > 0 else (1 - eps4, 1 + eps3)
    return clip(r, lo, hi) * a, (a if lo < r < hi else 0.0)


def values_and_grads(fn, ratio, adv, *args):
    r = ratio.clone().requires_grad_(True)
    out = fn(r, adv, *args)
    out.sum().backward()
    return out.detach(), r.grad


def test_inputs_cover_all_quadrants_inside_and_outside_the_bounds():
    ratio, adv = random_inputs()
    for pos in (adv > 0, adv < 0):
        for region in (ratio < 0.75, (ratio > 0.9) & (ratio < 1), (ratio > 1) & (ratio < 1.05), ratio > 1.35):
            assert (pos & region).sum() > 50


def test_grpo_matches_its_formula_values_and_gradients():
    ratio, adv = random_inputs()
    values, grads = values_and_grads(grpo_token_objective, ratio, adv, 0.2, 0.28)
    for r, a, v, g in zip(ratio.tolist(), adv.tolist(), values.tolist(), grads.tolist(), strict=True):
        want_v, want_g = grpo_direct(r, a, 0.2, 0.28)
        assert v == pytest.approx(want_v, abs=1e-15)
        assert g == want_g  # exactly: 0 where the bound is active, A elsewhere


def test_abc_matches_its_formula_values_and_gradients():
    ratio, adv = random_inputs()
    values, grads = values_and_grads(abc_token_objective, ratio, adv, *EPS.values())
    for r, a, v, g in zip(ratio.tolist(), adv.tolist(), values.tolist(), grads.tolist(), strict=True):
        want_v, want_g = abc_direct(r, a, *EPS.values())
        assert v == pytest.approx(want_v, abs=1e-15)
        assert g == want_g


def test_gradient_is_exactly_zero_where_clip_bounds_says_clipped():
    ratio, adv = random_inputs()
    for fn, args, bounds in ((abc_token_objective, tuple(EPS.values()), ClipBounds(**EPS)),
                             (grpo_token_objective, (0.2, 0.28), ClipBounds.grpo(0.2, 0.28))):
        _, grads = values_and_grads(fn, ratio, adv, *args)
        clipped = bounds.clipped(ratio, adv)
        assert clipped.any() and (~clipped).any()
        assert torch.equal(grads[clipped], torch.zeros_like(grads[clipped]))
        assert torch.equal(grads[~clipped], adv[~clipped])


def test_abc_bounds_every_quadrant_grpo_leaves_two_unbounded():
    """Far outside every bound, ABC's value is the bound's and GRPO's in (A>0, r≪1) and (A<0, r≫1) is r·A."""
    ratio = torch.tensor([0.1, 0.1, 3.0, 3.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    abc = abc_token_objective(ratio, adv, 0.2, 0.2, 0.2, 0.2)
    grpo = grpo_token_objective(ratio, adv, 0.2, 0.2)
    assert abc.tolist() == pytest.approx([0.8, -0.8, 1.2, -1.2])
    assert grpo.tolist() == pytest.approx([0.1, -0.8, 1.2, -3.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abc_with_grpo_bounds_is_grpo_exactly(dtype):
    ratio, adv = random_inputs(dtype)
    eps_low, eps_high = 0.2, 0.28
    v_grpo, g_grpo = values_and_grads(grpo_token_objective, ratio, adv, eps_low, eps_high)
    v_abc, g_abc = values_and_grads(abc_token_objective, ratio, adv, eps_high, math.inf, math.inf, eps_low)
    assert torch.equal(v_grpo, v_abc)
    assert torch.equal(g_grpo, g_abc)


def test_sequence_advantages_broadcast_over_tokens():
    ratio, adv = random_inputs(n=60)
    ratio, seq_adv = ratio.view(6, 10), adv[:6]
    per_token = abc_token_objective(ratio, seq_adv, *EPS.values())
    expanded = abc_token_objective(ratio, seq_adv[:, None].expand(6, 10), *EPS.values())
    assert per_token.shape == ratio.shape
    assert torch.equal(per_token, expanded)


def test_negative_or_nan_bound_is_a_config_error():
    ratio, adv = random_inputs(n=8)
    with pytest.raises(ConfigError, match="eps3"):
        abc_token_objective(ratio, adv, 0.2, 0.2, -0.1, 0.2)
    with pytest.raises(ConfigError, match="eps_low"):
        grpo_token_objective(ratio, adv, math.nan, 0.2)


def test_group_advantages_are_grpos_group_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.2, 0.9, 1.0])
    got = group_advantages(rewards, 4)
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)
        want = [(r - mean) / (std + 1e-4) for r in group]
        assert got[4 * g:4 * g + 4].tolist() == pytest.approx(want, rel=1e-6)
    assert torch.equal(got[4:8], torch.zeros(4))  # equal rewards: no signal, not NaN
    shifted = group_advantages(rewards + 3.0, 4)
    torch.testing.assert_close(shifted, got, atol=1e-6, rtol=0)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ConfigError, match="at least 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ConfigError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_clip_statistics_count_quadrants_and_clipped_tokens():
    ratio = torch.tensor([[1.5, 1.1, 0.5, 0.9], [1.5, 1.1, 0.5, 0.9], [1.0, 1.0, 2.0, 2.0]])
    adv = torch.tensor([1.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    stats = {k: v.item() for k, v in clip_statistics(ratio, adv, mask, ClipBounds(0.2, 0.2, 0.2, 0.2)).items()}
    n = 10
    assert [stats[f"quadrant_{q}"] for q in QUADRANTS] == pytest.approx([2 / n, 2 / n, 2 / n, 2 / n])
    assert stats["quadrant_zero_adv"] == pytest.approx(2 / n)
    assert sum(stats[f"quadrant_{q}"] for q in (*QUADRANTS, "zero_adv")) == pytest.approx(1.0)
    # ABC clips r=1.5 and r=0.5 in both signs; r=1.1, 0.9 are inside; A = 0 tokens are never counted.
    assert stats["clipped"] == pytest.approx(4 / n)
    assert stats["clipped_pos_up"] == pytest.approx(1 / n) and stats["clipped_neg_down"] == pytest.approx(1 / n)
    # GRPO leaves (A>0, r=0.5) and (A<0, r=1.5) unbounded.
    assert stats["grpo_unbounded"] == pytest.approx(2 / n)
    grpo = clip_statistics(ratio, adv, mask, ClipBounds.grpo(0.2, 0.2))
    assert grpo["clipped"].item() == pytest.approx(2 / n)
