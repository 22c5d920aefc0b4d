"""Tests of cka.py against Gram-matrix references written here (HKH/HLH, and the unbiased centring of
Kornblith et al.'s `center_gram(unbiased=True)`), plus the properties of METHOD.md §4."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import representation_pairs

from ckaqad.cka import CKAAccumulator, linear_cka, unbiased_hsic_terms

PROPS = settings(max_examples=30, deadline=None)
F64 = dict(dtype=torch.float64)


def centering(n: int) -> torch.Tensor:
    """H = I - 11ᵀ/n, float64."""
    return torch.eye(n, **F64) - torch.full((n, n), 1.0 / n, **F64)


def gram_cka_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with K = XXᵀ, L = YYᵀ, in float64."""
    x, y = x.double(), y.double()
    h = centering(x.shape[0])
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / (k.norm() * l.norm()))


def center_gram_unbiased(gram: torch.Tensor) -> torch.Tensor:
    """Kornblith et al.'s `center_gram(gram, unbiased=True)`: zero the diagonal, subtract row/column means
    with the n - 2 and n - 1 corrections, zero the diagonal again."""
    n = gram.shape[0]
    gram = gram.clone()
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    gram.fill_diagonal_(0)
    return gram


def debiased_cka_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    k = center_gram_unbiased(x.double() @ x.double().T)
    l = center_gram_unbiased(y.double() @ y.double().T)
    return float((k * l).sum() / (k.norm() * l.norm()))


def unbiased_hsic_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. 2012's unbiased HSIC of the linear kernels, written out:
    [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)), K̃ = K with a zero diagonal.

    The estimator is invariant to shifting the features, so they are centred first (in float64) to keep the
    digits that a 1e4 offset would cancel away in K."""
    n = x.shape[0]
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, **F64)
    total = (k @ l).trace() + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (
        one @ k @ l @ one)
    return float(total / (n * (n - 3)))


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, **F64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


# ---------------------------------------------------------------------------------------------------------
# The references themselves


def test_references_agree_with_each_other():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=gen, **F64) + 3, torch.randn(9, 3, generator=gen, **F64) - 1
    k, l = center_gram_unbiased(x @ x.T), center_gram_unbiased(y @ y.T)
    assert float((k * l).sum()) / (9 * 6) == pytest.approx(unbiased_hsic_reference(x, y), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Biased linear CKA: golden properties


@PROPS
@given(representation_pairs())
def test_cka_of_a_representation_with_itself_is_one(pair):
    x, y = pair
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(y, y.clone())) == pytest.approx(1.0, abs=1e-12)


@PROPS
@given(representation_pairs())
def test_symmetric(pair):
    x, y = pair
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)), rel=1e-12, abs=1e-15)


@PROPS
@given(representation_pairs())
def test_in_unit_interval(pair):
    x, y = pair
    value = float(linear_cka(x, y))
    assert 0.0 <= value <= 1.0 + 1e-12


@PROPS
@given(representation_pairs(), st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6), st.floats(-1e6, -1e-6))
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(pair, seed, a, b):
    x, y = pair
    gen = torch.Generator().manual_seed(seed)
    q1, q2 = random_orthogonal(x.shape[1], gen), random_orthogonal(y.shape[1], gen)
    base = float(linear_cka(x, y))
    assert float(linear_cka(x @ q1, y @ q2)) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert float(linear_cka(a * x, b * y)) == pytest.approx(base, rel=1e-9, abs=1e-12)


def test_not_invariant_to_a_general_invertible_map():
    # A = Q1 diag(100 ... 0.01) Q2 is invertible but stretches some directions 10^4 times more than others.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, **F64)
    y = x + 0.5 * torch.randn(200, 8, generator=gen, **F64)
    a = random_orthogonal(8, gen) @ torch.diag(torch.logspace(2, -2, 8, **F64)) @ random_orthogonal(8, gen)
    assert torch.linalg.matrix_rank(a) == 8
    base = float(linear_cka(x, y))  # about 0.79
    assert abs(float(linear_cka(x @ a, y)) - base) > 0.3  # about 0.31
    assert float(linear_cka(x @ a, x)) < 0.5  # a representation against its own linear image


@PROPS
@given(representation_pairs(max_n=24, max_d=40))
def test_feature_and_gram_forms_agree_with_the_gram_reference(pair):
    # linear_cka uses the feature form when n > d and the Gram form otherwise; both equal ⟨HKH, HLH⟩ / ...
    x, y = pair
    assert float(linear_cka(x, y)) == pytest.approx(gram_cka_reference(x, y), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), [(5, 20, 20), (50, 3, 4), (16, 16, 16), (12, 30, 2)])
def test_both_regimes_against_the_gram_reference(n, d1, d2):
    gen = torch.Generator().manual_seed(n + d1)
    x = torch.randn(n, d1, generator=gen, **F64)
    y = x[:, :1] * torch.randn(1, d2, generator=gen, **F64) + torch.randn(n, d2, generator=gen, **F64)
    assert float(linear_cka(x, y)) == pytest.approx(gram_cka_reference(x, y), rel=1e-10)
    # float32 inputs are computed in float32, still close.
    assert float(linear_cka(x.float(), y.float())) == pytest.approx(gram_cka_reference(x, y), rel=1e-4)


def test_dtype_promotion():
    x = torch.randn(10, 4).bfloat16()
    assert linear_cka(x, x).dtype == torch.float32
    assert linear_cka(x.double(), x).dtype == torch.float64


def test_unrelated_inputs_give_low_cka():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 4, generator=gen, **F64), torch.randn(4000, 4, generator=gen, **F64)
    assert float(linear_cka(x, y)) < 0.01


def test_constant_input_gives_zero_not_nan():
    x = torch.ones(8, 3)
    y = torch.randn(8, 3)
    assert float(linear_cka(x, y)) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Debiased CKA


@PROPS
@given(representation_pairs(min_n=5, max_n=30, max_d=40))
def test_debiased_matches_the_unbiased_gram_reference(pair):
    x, y = pair
    expected = debiased_cka_reference(x, y)
    assert float(linear_cka(x, y, debiased=True)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_debiased_is_near_zero_for_unrelated_inputs_where_biased_is_not():
    # With few tokens and many features the biased estimator is far from 0 even for independent data.
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 256, generator=gen, **F64), torch.randn(64, 256, generator=gen, **F64)
    assert float(linear_cka(x, y)) > 0.5
    assert abs(float(linear_cka(x, y, debiased=True))) < 0.05


def test_debiased_of_itself_is_one():
    x = torch.randn(20, 5, **F64)
    assert float(linear_cka(x, x, debiased=True)) == pytest.approx(1.0, abs=1e-12)


def test_input_errors():
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError):
        linear_cka(torch.randn(3, 4), torch.randn(3, 4), debiased=True)
    with pytest.raises(ValueError):
        unbiased_hsic_terms(torch.randn(3, 4), torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------------------
# Numerics and gradients

@pytest.mark.parametrize(("dtype", "scale"), [
    (torch.float32, 1e15), (torch.float32, 1e-10), (torch.float64, 1e20), (torch.float64, 1e150),
    (torch.float64, 1e-10),
    (torch.float32, 1e20), (torch.float32, 1e-20), (torch.float64, 1e160), (torch.float64, 1e-100),
])
@pytest.mark.parametrize("debiased", [False, True])
def test_huge_and_tiny_values_give_the_same_result(dtype, scale, debiased):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=gen, dtype=dtype)
    y = x @ torch.randn(8, 8, generator=gen, dtype=dtype) + torch.randn(64, 8, generator=gen, dtype=dtype)
    base = linear_cka(x, y, debiased=debiased)
    for scaled in (linear_cka(x * scale, y * scale, debiased=debiased),
                   linear_cka(x * scale, y, debiased=debiased), linear_cka(x[:6] * scale, y[:6])):
        assert torch.isfinite(scaled)
    assert float(linear_cka(x * scale, y * scale, debiased=debiased)) == pytest.approx(float(base), rel=1e-5)
    assert float(linear_cka(x * scale, y, debiased=debiased)) == pytest.approx(float(base), rel=1e-5)
    # Gram form (n < d).
    assert float(linear_cka(x[:6] * scale, y[:6])) == pytest.approx(float(linear_cka(x[:6], y[:6])), rel=1e-5)


def test_massive_activation_rows_stay_finite_in_float32():
    # An attention-sink-like row 1e4 times larger than the rest: ‖·‖⁴ would overflow without normalising.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(128, 64, generator=gen) * 1e3
    x[0] *= 1e4
    y = x + torch.randn(128, 64, generator=gen)
    value = linear_cka(x, y)
    assert torch.isfinite(value) and 0.99 < float(value) <= 1.0 + 1e-6


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "d"), [(32, 8), (6, 16)])
def test_gradient_exists_and_is_finite(debiased, n, d):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, d, generator=gen).requires_grad_()
    y = (torch.randn(n, d, generator=gen) + x.detach()).requires_grad_()
    value = linear_cka(x, y, debiased=debiased)
    (1 - value).backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # At the maximum (x against itself) the gradient is finite and vanishes.
    z = torch.randn(n, d, generator=gen).requires_grad_()
    linear_cka(z, z.detach()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() < 1e-4


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 3, generator=gen, **F64).requires_grad_()
    y = torch.randn(10, 4, generator=gen, **F64)
    assert torch.autograd.gradcheck(lambda a: linear_cka(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a: linear_cka(a, y, debiased=True), (x,))


# ---------------------------------------------------------------------------------------------------------
# Streaming accumulator


def minibatches(sizes, offset: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for n in sizes:
        x = torch.randn(n, 6, generator=gen, **F64)
        y = x[:, :3] @ torch.randn(3, 5, generator=gen, **F64) + 0.7 * torch.randn(n, 5, generator=gen, **F64)
        x[:, 2] += offset
        y[:, 0] += offset / 2
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("sizes", [(40, 17, 3, 64), (2, 100), (7,)])
def test_accumulator_biased_equals_cka_of_the_concatenation(sizes, offset):
    xs, ys = minibatches(sizes, offset, seed=len(sizes))
    acc = CKAAccumulator()
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    x_all = torch.cat(xs)
    expected = float(linear_cka(x_all, torch.cat(ys)))
    assert acc.n == sum(sizes)
    assert acc.biased() == pytest.approx(expected, rel=1e-9)
    if offset == 0:  # the uncentred Gram reference loses digits to a large offset
        assert acc.biased() == pytest.approx(gram_cka_reference(x_all, torch.cat(ys)), rel=1e-9)


def test_accumulator_biased_with_a_large_offset_in_a_later_batch_only():
    # The shift comes from the first batch; later batches far from it must not lose the centring.
    xs, ys = minibatches((30, 30, 30), 0.0, seed=8)
    xs[1] = xs[1] + 1e4
    acc = CKAAccumulator()
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    assert acc.biased() == pytest.approx(float(linear_cka(torch.cat(xs), torch.cat(ys))), rel=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_accumulator_debiased_is_the_mean_of_minibatch_hsic(offset):
    sizes = (40, 17, 3, 64, 5)  # the 3-token batch has no unbiased HSIC and is left out
    xs, ys = minibatches(sizes, offset, seed=9)
    acc = CKAAccumulator()
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    used = [(x, y) for x, y in zip(xs, ys, strict=True) if x.shape[0] > 3]
    assert acc.batches == len(used) == 4
    xy = sum(unbiased_hsic_reference(x, y) for x, y in used) / len(used)
    xx = sum(unbiased_hsic_reference(x, x) for x, _ in used) / len(used)
    yy = sum(unbiased_hsic_reference(y, y) for _, y in used) / len(used)
    assert acc.debiased() == pytest.approx(xy / math.sqrt(xx * yy), rel=1e-7)
    for x, y in used:
        terms = unbiased_hsic_terms(x, y).tolist()
        expected = [unbiased_hsic_reference(x, y), unbiased_hsic_reference(x, x), unbiased_hsic_reference(y, y)]
        assert terms == pytest.approx(expected, rel=1e-7)


def test_accumulator_single_batch_debiased_equals_debiased_cka():
    xs, ys = minibatches((50,), 0.0, seed=10)
    acc = CKAAccumulator()
    acc.update(xs[0], ys[0])
    assert acc.debiased() == pytest.approx(float(linear_cka(xs[0], ys[0], debiased=True)), rel=1e-9)


def test_accumulator_empty_is_nan_and_inputs_are_detached():
    acc = CKAAccumulator()
    assert math.isnan(acc.biased()) and math.isnan(acc.debiased())
    acc.update(torch.randn(1, 3), torch.randn(1, 3))
    assert math.isnan(acc.biased())
    x = torch.randn(10, 3, requires_grad=True)
    acc.update(x, torch.randn(10, 3))
    assert isinstance(acc.biased(), float) and 0.0 <= acc.biased() <= 1.0
