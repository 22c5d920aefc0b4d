"""Tests for `ckaqad.objectives.hidden` (the cosine and MSE baselines) and the debiased option of the CKA term,
against float64 formulas written here (values and gradients), the auto balance of `Composite` for each, and
LossParts as a mapping of named terms. Their 2-process equality is in tests/parallel/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import OBJECTIVES, ForwardOutputs, LossParts
from ckaqad.objectives.cka import CKAConfig, cka_term
from ckaqad.objectives.compose import Composite, ObjectiveConfig
from ckaqad.objectives.hidden import HiddenCosineConfig, HiddenMSEConfig, hidden_cosine_term, hidden_mse_term
from ckaqad.objectives.kl import chunked_kl


def paired_states(n_layers: int = 3, n: int = 40, d: int = 12, seed: int = 0
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Student states = teacher states + noise, with a few large rows (massive-activation-like)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = {i: torch.randn(n, d, generator=gen) for i in range(n_layers)}
    for y in teacher.values():
        y[:3] *= 20.0
    student = {i: y + 0.3 * torch.randn(n, d, generator=gen) for i, y in teacher.items()}
    return student, teacher


def cosine_reference(xs: dict, ys: dict) -> torch.Tensor:
    """(1/L) Σ_l (1/n) Σ_i (1 − x·y / (|x| |y|)) in float64."""
    per_layer = []
    for key, x in xs.items():
        x, y = x.double(), ys[key].double()
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        per_layer.append((1 - cos).mean())
    return torch.stack(per_layer).mean()


def mse_reference(xs: dict, ys: dict) -> torch.Tensor:
    """(1/L) Σ_l (1/(n d)) Σ_ik (x_ik − y_ik)² in float64."""
    return torch.stack([(x.double() - ys[key].double()).square().mean() for key, x in xs.items()]).mean()


def debiased_cka_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CKA of the unbiased HSIC estimator (Song et al. 2012) in its n×n Gram form, float64:
    HSIC₁(K, L) ∝ tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1, K̃ = K with a zero diagonal."""
    def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        k, l = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
        one = torch.ones(n, 1, dtype=k.dtype)
        return (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one.T @ k @ l @ one)).squeeze()

    x, y = x.double(), y.double()
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


def grads_of(term_fn, xs: dict, ys: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    leaves = {k: x.clone().requires_grad_(True) for k, x in xs.items()}
    value = term_fn(leaves, ys)
    value.backward()
    return value.detach(), {k: x.grad for k, x in leaves.items()}


@pytest.mark.parametrize(("term", "reference"), [(hidden_cosine_term, cosine_reference),
                                                 (hidden_mse_term, mse_reference)])
def test_hidden_terms_equal_their_formula_in_value_and_gradient(term, reference):
    xs, ys = paired_states()
    value, grads = grads_of(term, xs, ys)
    want, want_grads = grads_of(reference, {k: x.double() for k, x in xs.items()}, ys)
    assert value.dtype == torch.float32 and float(value) > 0
    assert float(value) == pytest.approx(float(want), rel=1e-5)
    for key in xs:
        torch.testing.assert_close(grads[key].double(), want_grads[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("term", [hidden_cosine_term, hidden_mse_term])
def test_hidden_terms_are_zero_at_the_teacher_and_run_in_fp32_from_bf16(term):
    _, ys = paired_states()
    assert float(term({k: y.clone() for k, y in ys.items()}, ys)) == pytest.approx(0.0, abs=1e-6)
    xs, _ = paired_states(seed=1)
    low = term({k: x.bfloat16() for k, x in xs.items()}, {k: y.bfloat16() for k, y in ys.items()})
    assert low.dtype == torch.float32


def test_cosine_ignores_each_tokens_scale_and_mse_does_not():
    """The two baselines differ in what they match: direction per token (cosine) vs the coordinates (MSE)."""
    xs, ys = paired_states()
    scales = torch.linspace(0.5, 3.0, 40)[:, None]
    scaled = {k: x * scales for k, x in xs.items()}
    assert float(hidden_cosine_term(scaled, ys)) == pytest.approx(float(hidden_cosine_term(xs, ys)), rel=1e-5)
    assert float(hidden_mse_term(scaled, ys)) > 1.5 * float(hidden_mse_term(xs, ys))


@pytest.mark.parametrize("term", [hidden_cosine_term, hidden_mse_term])
def test_hidden_terms_refuse_other_widths_and_no_layers(term):
    xs, ys = paired_states(d=12)
    narrow = {k: x[:, :8] for k, x in xs.items()}
    with pytest.raises(ConfigError, match="width 8"):
        term(narrow, ys)
    with pytest.raises(ConfigError, match="at least one layer"):
        term({}, {})


def test_debiased_cka_term_equals_the_gram_form_formula_in_value_and_gradient():
    xs, ys = paired_states(n=24, d=6)
    biased, _ = cka_term(xs, ys)

    def term(leaves, teacher):
        return cka_term(leaves, teacher, debiased=True)[0]

    def reference(leaves, teacher):
        return torch.stack([1 - debiased_cka_reference(x, teacher[k]) for k, x in leaves.items()]).mean()

    value, grads = grads_of(term, xs, ys)
    want, want_grads = grads_of(reference, {k: x.double() for k, x in xs.items()}, ys)
    assert float(value) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert abs(float(value) - float(biased)) > 1e-3  # the option changes the term
    for key in xs:
        torch.testing.assert_close(grads[key].double(), want_grads[key], rtol=1e-3, atol=1e-6)


def test_cka_objective_passes_the_debiased_option():
    xs, ys = paired_states(n=24, d=6)
    out = ForwardOutputs(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), {}, xs, ys)
    parts = Composite(ObjectiveConfig(loss="cka", cka=CKAConfig(cka_debiased=True)))(out)
    assert torch.equal(parts.cka_term, cka_term(xs, ys, debiased=True)[0])
    assert torch.equal(parts.cka_layers, cka_term(xs, ys, debiased=True)[1])


# ---------------------------------------------------------------------------------------------------------
# Composite: the auto balance and the named parts


def real_outputs(seed: int = 7) -> ForwardOutputs:
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    xs, ys = paired_states()
    return ForwardOutputs(s.requires_grad_(True), t, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          {k: x.requires_grad_(True) for k, x in xs.items()}, ys)


@pytest.mark.parametrize(("loss", "metric", "weight_metric", "term", "config"), [
    ("kl+hidden-cosine", "cosine_term", "cosine_weight", hidden_cosine_term,
     {"hidden_cosine": HiddenCosineConfig(cosine_alpha=0.5)}),
    ("kl+hidden-mse", "mse_term", "mse_weight", hidden_mse_term, {"hidden_mse": HiddenMSEConfig(mse_alpha=0.5)}),
    ("kl+cka", "cka_term", "cka_weight", lambda xs, ys: cka_term(xs, ys)[0], {"cka": CKAConfig(cka_alpha=0.5)}),
])
def test_auto_balance_gives_each_term_alpha_times_the_kl_with_a_detached_lambda(loss, metric, weight_metric,
                                                                               term, config):
    out = real_outputs()
    parts = Composite(ObjectiveConfig(loss=loss, **config))(out)
    kl = chunked_kl(out.student_logits, out.teacher_logits, out.batch["attention_mask"]).detach()
    value = term(out.student_states, out.teacher_states).detach()
    assert set(parts.terms) == {"kl", metric}
    assert torch.equal(parts.terms["kl"], kl) and torch.equal(parts.terms[metric], value)
    lam = float(parts.weights[weight_metric])
    assert lam == pytest.approx(0.5 * float(kl) / float(value), rel=1e-6)
    assert float(parts.loss) == pytest.approx(1.5 * float(kl), rel=1e-6)
    assert float(parts.cka_weight) == (lam if metric == "cka_term" else 0.0)
    # d loss / d states = λ · d term / d states: λ is a stop-gradient
    parts.loss.backward()
    leaves = {k: x.detach().clone().requires_grad_(True) for k, x in out.student_states.items()}
    term(leaves, out.teacher_states).backward()
    for key, x in out.student_states.items():
        want = lam * leaves[key].grad  # float32 rounding of λ·g: a few ulps of the largest entry
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(("config", "weight_metric"), [
    ({"hidden_cosine": HiddenCosineConfig(cosine_weight="3")}, "cosine_weight"),
    ({"hidden_mse": HiddenMSEConfig(mse_weight="3")}, "mse_weight")])
def test_fixed_weights_of_the_hidden_terms(config, weight_metric):
    out = real_outputs()
    loss = "kl+" + next(iter(config)).replace("_", "-")
    parts = Composite(ObjectiveConfig(loss=loss, **config))(out)
    other = next(v for k, v in parts.terms.items() if k != "kl")
    assert float(parts.weights[weight_metric]) == 3.0
    assert float(parts.loss) == pytest.approx(float(parts.kl.detach() + 3.0 * other.detach()), rel=1e-6)


def test_all_terms_compose_under_their_own_names():
    parts = Composite(ObjectiveConfig(loss="kl+cka+hidden-cosine+hidden-mse"))(real_outputs())
    assert isinstance(parts, LossParts)
    assert list(parts.terms) == ["kl", "cka_term", "cosine_term", "mse_term"]
    assert list(parts.weights) == ["cka_weight", "cosine_weight", "mse_weight"]
    assert float(parts.loss) == pytest.approx(4 * float(parts.kl), rel=1e-5)  # three auto terms at α = 1
    assert parts.ce is None


def test_a_hidden_term_first_has_weight_one():
    parts = Composite(ObjectiveConfig(loss="hidden-mse"))(real_outputs())
    assert parts.loss is parts.terms["mse_term"] and float(parts.weights["mse_weight"]) == 1.0
    assert float(parts.cka_weight) == 0.0 and parts.kl is None


def test_objective_config_knows_which_terms_read_states():
    assert set(OBJECTIVES.names()) >= {"hidden-cosine", "hidden-mse"}
    assert {loss: ObjectiveConfig(loss=loss).uses_states for loss in
            ("kl", "kl+cka", "kl+hidden-cosine", "hidden-mse", "kl+ce")} == {
        "kl": False, "kl+cka": True, "kl+hidden-cosine": True, "hidden-mse": True, "kl+ce": False}


@pytest.mark.parametrize(("make", "message"), [
    (lambda: HiddenCosineConfig(cosine_weight="much"), "--cosine-weight must be 'auto' or a number"),
    (lambda: HiddenCosineConfig(cosine_weight="-1"), "--cosine-weight must be non-negative"),
    (lambda: HiddenCosineConfig(cosine_alpha=-0.1), "--cosine-alpha must be non-negative"),
    (lambda: HiddenMSEConfig(mse_weight="x"), "--mse-weight must be 'auto' or a number"),
    (lambda: HiddenMSEConfig(mse_alpha=-1.0), "--mse-alpha must be non-negative"),
])
def test_hidden_configs_refuse_bad_values(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_hidden_configs_normalise_numeric_weights():
    assert HiddenCosineConfig(cosine_weight="1e-1").cosine_weight == "0.1"
    assert HiddenMSEConfig(mse_weight="2").mse_weight == "2.0"
