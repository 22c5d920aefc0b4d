"""Tests for `ckaqad.losses` against float64 references written here: forward KL(teacher ‖ student) (METHOD.md
§5), its top-k and tail variants, the chunked custom-autograd KL (value and gradient), the CKA term, the
λ rule of `Composite`, the objective configs' checks and the next-token NLL."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import representation_pairs
from torch.nn import functional as F

from ckaqad.cka import linear_cka
from ckaqad.errors import ConfigError
from ckaqad.objectives.base import OBJECTIVES, ForwardOutputs
from ckaqad.objectives.ce import CEConfig, next_token_nll
from ckaqad.objectives.cka import CKAConfig, cka_term
from ckaqad.objectives.compose import Composite, ObjectiveConfig
from ckaqad.objectives.kl import KLConfig, chunked_kl, kl_per_token

PROPS = settings(max_examples=25, deadline=None)
F32_TOL = dict(rtol=1e-5, atol=1e-6)  # the KL is computed in float32


def logits(*shape: int, seed: int = 0, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) · T², p = softmax(teacher / T), q = softmax(student / T), in float64."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum(-1) * temperature**2


def topk_reference(student: torch.Tensor, teacher: torch.Tensor, k: int, tail: bool) -> torch.Tensor:
    """Teacher's top-k (renormalised, or plus one tail outcome holding the rest) vs the student's full-vocab
    probabilities of those tokens (and of the rest, for the tail), in float64."""
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    p_k, index = p.topk(k, dim=-1)
    q_k = q.gather(-1, index)
    if not tail:
        p_k = p_k / p_k.sum(-1, keepdim=True)
        return (p_k * (p_k.log() - q_k.log())).sum(-1)
    p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    return (p_k * (p_k / q_k).log()).sum(-1) + p_tail * (p_tail / q_tail).log()


# ---------------------------------------------------------------------------------------------------------
# kl_per_token


def test_kl_is_zero_for_identical_logits():
    t = logits(6, 50)
    assert torch.equal(kl_per_token(t.clone(), t), torch.zeros(6))
    # Shifting every logit of a row by a constant changes no probability.
    assert torch.allclose(kl_per_token(t + 3.5, t), torch.zeros(6), atol=1e-6)


def test_kl_is_positive_for_different_logits():
    kl = kl_per_token(logits(6, 50, seed=1), logits(6, 50, seed=2))
    assert kl.dtype == torch.float32 and kl.shape == (6,)
    assert (kl > 1e-3).all()


def test_kl_matches_the_forward_direction_teacher_to_student():
    s, t = logits(8, 30, seed=1), logits(8, 30, seed=2, scale=4.0)
    forward, reverse = kl_reference(s, t), kl_reference(t, s)
    assert (forward - reverse).abs().min() > 1e-2  # the two directions are distinguishable here
    torch.testing.assert_close(kl_per_token(s, t).double(), forward, **F32_TOL)


def test_kl_golden_two_tokens():
    # teacher p = (1/2, 1/2), student q = (1/4, 3/4): KL = ½ log 2 + ½ log(2/3)
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.zeros(1, 2)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl_per_token(s, t)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_divides_logits_and_scales_by_t_squared(temperature):
    s, t = logits(5, 40, seed=3), logits(5, 40, seed=4)
    got = kl_per_token(s, t, temperature=temperature)
    torch.testing.assert_close(got.double(), kl_reference(s, t, temperature), **F32_TOL)
    torch.testing.assert_close(got, kl_per_token(s / temperature, t / temperature) * temperature**2, **F32_TOL)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [40, 41, 1000])
def test_topk_at_least_vocab_equals_full(k, tail):
    s, t = logits(5, 40, seed=5), logits(5, 40, seed=6)
    torch.testing.assert_close(kl_per_token(s, t, topk=k, tail=tail), kl_per_token(s, t), rtol=0, atol=0)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [1, 3, 10, 39])
def test_topk_matches_reference(k, tail):
    s, t = logits(7, 40, seed=7), logits(7, 40, seed=8, scale=3.0)
    torch.testing.assert_close(kl_per_token(s, t, topk=k, tail=tail).double(), topk_reference(s, t, k, tail),
                               rtol=1e-4, atol=1e-6)


@PROPS
@given(k=st.integers(1, 19), seed=st.integers(0, 10_000), scale=st.floats(0.1, 8.0))
def test_topk_with_tail_is_a_proper_kl_below_the_full_one(k, seed, scale):
    """Merging the teacher's non-top-k outcomes into one bucket can only lose information."""
    s, t = logits(4, 20, seed=seed, scale=scale), logits(4, 20, seed=seed + 1, scale=scale)
    tail = kl_per_token(s, t, topk=k, tail=True)
    assert (tail >= -1e-6).all()
    assert (tail <= kl_per_token(s, t) + 1e-5).all()


def test_topk_penalises_student_mass_outside_the_teachers_topk():
    t = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    on_topk = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0]])
    off_topk = torch.tensor([[5.0, 4.0, 0.0, 0.0, 9.0]])  # same ratio on the top-2, mass moved to token 4
    for tail in (False, True):
        assert float(kl_per_token(off_topk, t, topk=2, tail=tail)) > float(kl_per_token(on_topk, t, topk=2, tail=tail))


def test_kl_of_bf16_logits_is_float32():
    s, t = logits(4, 32, seed=9), logits(4, 32, seed=10)
    got = kl_per_token(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), kl_reference(s.bfloat16(), t.bfloat16()), **F32_TOL)


# ---------------------------------------------------------------------------------------------------------
# chunked_kl: value and gradient


def plain_kl(student, teacher, mask=None, **kwargs):
    """The unchunked objective written with kl_per_token and ordinary autograd."""
    kl = kl_per_token(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), **kwargs)
    w = torch.ones_like(kl) if mask is None else mask.reshape(-1).float()
    return (kl * w).sum() / w.sum().clamp_min(1.0)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 1024])
@pytest.mark.parametrize("kwargs", [{}, {"temperature": 2.0}, {"topk": 5}, {"topk": 5, "tail": True}])
def test_chunked_kl_equals_unchunked_value_and_gradient(chunk_tokens, kwargs):
    s = logits(2, 5, 24, seed=11).requires_grad_()
    t = logits(2, 5, 24, seed=12)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    got = chunked_kl(s, t, mask, chunk_tokens=chunk_tokens, **kwargs)
    (grad,) = torch.autograd.grad(got, s)
    s_ref = s.detach().clone().requires_grad_()
    ref = plain_kl(s_ref, t, mask, **kwargs)
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **F32_TOL)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


@PROPS
@given(rows=st.integers(1, 12), vocab=st.integers(2, 30), chunk=st.integers(1, 13), seed=st.integers(0, 10_000),
       masked=st.booleans())
def test_chunked_kl_is_the_masked_mean_of_kl_per_token(rows, vocab, chunk, seed, masked):
    s, t = logits(rows, vocab, seed=seed), logits(rows, vocab, seed=seed + 1)
    mask = (torch.arange(rows) % 3 != 1) if masked else None
    kl = kl_reference(s, t)
    expected = kl.mean() if mask is None else kl[mask].sum() / max(int(mask.sum()), 1)
    torch.testing.assert_close(chunked_kl(s, t, mask, chunk_tokens=chunk).double(), expected, **F32_TOL)


def test_chunked_kl_gradcheck():
    """Finite differences of the custom autograd function (float64 inputs; the KL itself runs in float32,
    hence the float32-sized tolerances). gradcheck also feeds grad_outputs other than 1."""
    s = logits(4, 6, seed=13, dtype=torch.float64).requires_grad_()
    t = logits(4, 6, seed=14, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    for kwargs in ({}, {"temperature": 1.5}, {"topk": 3, "tail": True}):
        assert torch.autograd.gradcheck(lambda x, kw=kwargs: chunked_kl(x, t, mask, chunk_tokens=3, **kw), (s,),
                                        eps=1e-3, atol=2e-4, rtol=1e-2)


def test_chunked_kl_gradient_scales_with_the_incoming_gradient():
    s = logits(3, 10, seed=15).requires_grad_()
    t = logits(3, 10, seed=16)
    (once,) = torch.autograd.grad(chunked_kl(s, t, chunk_tokens=2), s)
    (thrice,) = torch.autograd.grad(3.0 * chunked_kl(s, t, chunk_tokens=2), s)
    torch.testing.assert_close(thrice, 3.0 * once)
    assert once.abs().max() > 1e-3


def test_mask_excludes_positions():
    s = logits(2, 4, 16, seed=17).requires_grad_()
    t = logits(2, 4, 16, seed=18)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    base = chunked_kl(s, t, mask, chunk_tokens=3)
    (grad,) = torch.autograd.grad(base, s)
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    assert (grad[mask == 1].abs().sum(-1) > 0).all()
    changed = s.detach().clone()
    changed[mask == 0] = logits(3, 16, seed=19, scale=10.0)
    torch.testing.assert_close(chunked_kl(changed, t, mask), base.detach(), **F32_TOL)
    assert float(chunked_kl(s.detach(), t, torch.zeros(2, 4))) == 0.0  # nothing selected


def test_chunked_kl_bf16_gradient_keeps_the_logits_dtype():
    s = logits(6, 32, seed=20).bfloat16().requires_grad_()
    t = logits(6, 32, seed=21).bfloat16()
    got = chunked_kl(s, t, chunk_tokens=4)
    got.backward()
    assert got.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, plain_kl(s.detach(), t), **F32_TOL)


def test_chunked_kl_gives_the_teacher_no_gradient_and_works_without_grad():
    s = logits(4, 8, seed=22)
    t = logits(4, 8, seed=23).requires_grad_()
    out = chunked_kl(s, t)
    assert not out.requires_grad and t.grad is None
    torch.testing.assert_close(out, plain_kl(s, t.detach()), **F32_TOL)


def test_chunked_kl_vocab_mismatch():
    with pytest.raises(ConfigError, match="vocabularies differ"):
        chunked_kl(logits(2, 10), logits(2, 11))


# ---------------------------------------------------------------------------------------------------------
# cka_term


def states(n_layers: int, n: int = 48, d: int = 16, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(n, d, generator=gen) for i in range(n_layers)}


def test_cka_term_is_zero_when_student_equals_teacher():
    teacher = states(3)
    student = {i: x.clone().requires_grad_() for i, x in teacher.items()}
    term, per_layer = cka_term(student, teacher)
    assert abs(float(term.detach())) < 1e-6
    assert per_layer.shape == (3,) and not per_layer.requires_grad
    assert torch.allclose(per_layer, torch.ones(3), atol=1e-6)
    term.backward()
    assert all(x.grad.isfinite().all() for x in student.values())


@PROPS
@given(pair=representation_pairs(min_n=4, max_n=40, max_d=12, dtype=torch.float32), n_layers=st.integers(1, 3))
def test_cka_term_is_the_mean_of_one_minus_cka_in_0_1(pair, n_layers):
    x, y = pair
    student = {i: x * (i + 1) for i in range(n_layers)}
    teacher = {i: y + i for i in range(n_layers)}
    term, per_layer = cka_term(student, teacher)
    # CKA <= 1 (Cauchy-Schwarz), but in float32 an exactly aligned pair (d = 1, y = a*x + b, as hypothesis
    # finds) computes to 1 + 1 ulp, so 1 - CKA reaches -1.2e-7: the interval holds to float32 rounding.
    slack = 4 * torch.finfo(torch.float32).eps
    assert -slack <= float(term) <= 1.0 + slack
    expected = sum(1 - float(linear_cka(student[i], teacher[i])) for i in range(n_layers)) / n_layers
    assert float(term) == pytest.approx(expected, abs=1e-6)
    assert bool(((per_layer >= -slack) & (per_layer <= 1 + slack)).all())


def test_cka_term_only_uses_the_students_layers():
    teacher = states(4, seed=1)
    student = {1: states(1, seed=2)[0], 3: teacher[3].clone()}
    term, per_layer = cka_term(student, teacher)
    assert per_layer.shape == (2,)  # in the order of the student's keys: 1, 3
    assert float(per_layer[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(term) == pytest.approx((1 - float(per_layer[0])) / 2, abs=1e-6)


@pytest.mark.parametrize("kind", ["random", "identical", "constant", "zero"])
def test_cka_term_gradient_is_finite(kind):
    teacher = states(2, seed=3)
    base = {"random": states(2, seed=4), "identical": teacher,
            "constant": {i: torch.ones(48, 16) for i in teacher}, "zero": {i: torch.zeros(48, 16) for i in teacher}}
    student = {i: x.clone().requires_grad_() for i, x in base[kind].items()}
    term, _ = cka_term(student, teacher)
    term.backward()
    assert term.isfinite()
    assert all(x.grad.isfinite().all() for x in student.values())
    if kind == "random":
        assert all(x.grad.abs().max() > 0 for x in student.values())  # the term does pull the student


def test_cka_term_runs_in_float32_under_bf16_autocast():
    teacher = {i: x.bfloat16() for i, x in states(2, seed=5).items()}
    student = {i: x.bfloat16() for i, x in states(2, seed=6).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term, per_layer = cka_term(student, teacher)
    assert term.dtype == torch.float32
    expected = [float(linear_cka(student[i].double(), teacher[i].double())) for i in student]
    assert per_layer.tolist() == pytest.approx(expected, abs=1e-5)


def test_cka_term_needs_a_layer():
    with pytest.raises(ConfigError, match="at least one layer"):
        cka_term({}, states(1))


# ---------------------------------------------------------------------------------------------------------
# Composite: the weights of the terms of `--loss`


def composite(loss: str, values: dict[str, torch.Tensor], **config) -> Composite:
    """A Composite whose registered terms are replaced by stubs returning `values[name]`."""
    comp = Composite(ObjectiveConfig(loss=loss, **config))

    class Stub:
        """The registered term's name and weight rule, returning `values[name]`."""

        def __init__(self, name, real):
            self.name, self.real = name, real
            self.metric, self.weight_metric, self.weight = real.metric, real.weight_metric, real.weight
            self.last_layers = torch.tensor([0.9, 0.95]) if name == "cka" else None

        def __call__(self, out):
            return values[self.name]

    comp.terms = [(name, Stub(name, real)) for name, real in comp.terms]
    return comp


NO_INPUTS = ForwardOutputs(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), {})


def test_composite_without_cka_is_the_kl():
    kl = torch.tensor(0.7)
    parts = composite("kl", {"kl": kl})(NO_INPUTS)
    assert parts.loss is kl and float(parts.cka_weight) == 0.0 and parts.cka_term is None and parts.cka_layers is None


def test_composite_cka_only():
    cka = torch.tensor(0.3)
    parts = composite("cka", {"cka": cka})(NO_INPUTS)
    assert parts.loss is cka and float(parts.cka_weight) == 1.0 and parts.kl is None


@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0])
def test_composite_auto_weight_keeps_a_fixed_share_with_detached_lambda(alpha):
    kl = torch.tensor(0.8, requires_grad=True)
    cka = torch.tensor(0.02, requires_grad=True)
    parts = composite("kl+cka", {"kl": kl, "cka": cka}, cka=CKAConfig(cka_weight="auto", cka_alpha=alpha))(NO_INPUTS)
    lam = float(parts.cka_weight)
    assert lam == pytest.approx(alpha * 0.8 / 0.02, rel=1e-6)
    assert float(parts.loss.detach()) == pytest.approx((1 + alpha) * 0.8)  # the CKA term is α times the KL term
    parts.loss.backward()
    assert float(kl.grad) == pytest.approx(1.0)  # λ is a stop-gradient: no d λ / d KL
    assert float(cka.grad) == pytest.approx(lam)  # nor d λ / d CKA
    assert parts.cka_layers.tolist() == pytest.approx([0.9, 0.95])


def test_composite_auto_weight_with_a_zero_cka_term_is_finite():
    parts = composite("kl+cka", {"kl": torch.tensor(0.5), "cka": torch.tensor(0.0)})(NO_INPUTS)
    assert math.isfinite(float(parts.cka_weight)) and float(parts.loss.detach()) == pytest.approx(0.5)


def test_composite_fixed_weight():
    kl, cka = torch.tensor(0.8, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    parts = composite("kl+cka", {"kl": kl, "cka": cka}, cka=CKAConfig(cka_weight="2.5"))(NO_INPUTS)
    assert float(parts.cka_weight) == 2.5 and float(parts.loss.detach()) == pytest.approx(0.8 + 2.5 * 0.1)
    parts.loss.backward()
    assert float(cka.grad) == pytest.approx(2.5)


def test_composite_adds_ce_with_its_weight_last():
    kl, cka, ce = torch.tensor(0.8), torch.tensor(0.1), torch.tensor(2.0)
    parts = composite("kl+cka", {"kl": kl, "cka": cka, "ce": ce}, cka=CKAConfig(cka_weight="1"),
                      ce=CEConfig(ce_weight=0.5))(NO_INPUTS)
    assert float(parts.loss) == pytest.approx(0.8 + 0.1 + 0.5 * 2.0) and float(parts.ce) == 2.0


def test_composite_on_real_outputs_equals_its_terms():
    """The registered KL, CKA and CE objectives on one ForwardOutputs: the total is KL + λ·(1−CKA) + w·CE."""
    gen = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    xs, ys = states(2, seed=8), states(2, seed=9)
    out = ForwardOutputs(s, t, batch, xs, ys)
    parts = Composite(ObjectiveConfig(loss="kl+cka+ce", cka=CKAConfig(cka_weight="0.5")))(out)
    kl = chunked_kl(s, t, batch["attention_mask"])
    term, layers = cka_term(xs, ys)
    nll, count = next_token_nll(s, ids, batch["attention_mask"])
    assert torch.equal(parts.kl, kl) and torch.equal(parts.cka_term, term) and torch.equal(parts.cka_layers, layers)
    assert float(parts.loss) == pytest.approx(float(kl + 0.5 * term + 0.0 * nll / count), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# ObjectiveConfig and the term configs


def test_objective_config_defaults_and_terms():
    assert ObjectiveConfig().loss == "kl+cka" and ObjectiveConfig().cka.cka_weight == "auto"
    uses = {name: (ObjectiveConfig(loss=name).uses_kl, ObjectiveConfig(loss=name).uses_cka)
            for name in ("kl", "kl+cka", "cka")}
    assert uses == {"kl": (True, False), "kl+cka": (True, True), "cka": (False, True)}
    assert ObjectiveConfig(loss="kl", ce=CEConfig(ce_weight=0.5)).terms == ["kl", "ce"]
    assert set(OBJECTIVES.names()) >= {"kl", "cka", "ce"}


@pytest.mark.parametrize(("weight", "stored"), [("2", "2.0"), ("0", "0.0"), ("0.25", "0.25"), ("1e-3", "0.001")])
def test_cka_config_normalises_numeric_weights(weight, stored):
    assert CKAConfig(cka_weight=weight).cka_weight == stored


@pytest.mark.parametrize(("build", "match"), [
    (lambda: ObjectiveConfig(loss="kl+ck"), r"--loss.*'ck'.*did you mean: cka"),
    (lambda: ObjectiveConfig(loss="mse"), r"--loss.*choose from: ce, cka, hidden-cosine, hidden-mse, kl"),
    (lambda: ObjectiveConfig(loss="kl+kl"), "names a term twice"),
    (lambda: CKAConfig(cka_weight="heavy"), "--cka-weight must be 'auto' or a number"),
    (lambda: CKAConfig(cka_weight="-0.5"), "--cka-weight must be non-negative"),
    (lambda: KLConfig(temperature=0.0), "--temperature must be positive"),
    (lambda: KLConfig(temperature=-1.0), "--temperature must be positive"),
    (lambda: KLConfig(topk=-1), "--topk must be 0"),
    (lambda: CEConfig(ce_weight=-1.0), "--ce-weight must be non-negative"),
])
def test_objective_configs_invalid_values_name_the_flag(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


# ---------------------------------------------------------------------------------------------------------
# next_token_nll


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_next_token_nll_equals_cross_entropy_on_shifted_tokens(chunk_tokens):
    lg = logits(3, 7, 20, seed=24)
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    total, count = next_token_nll(lg, ids, chunk_tokens=chunk_tokens)
    expected = F.cross_entropy(lg[:, :-1].reshape(-1, 20).double(), ids[:, 1:].reshape(-1), reduction="sum")
    assert count == 3 * 6 and total.dtype == torch.float32
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_next_token_nll_skips_masked_targets():
    lg = logits(2, 6, 20, seed=25)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    total, count = next_token_nll(lg.bfloat16(), ids, mask, chunk_tokens=5)
    keep = mask[:, 1:].bool()
    nll = F.cross_entropy(lg.bfloat16()[:, :-1].float().reshape(-1, 20), ids[:, 1:].reshape(-1), reduction="none")
    assert count == int(keep.sum()) == 7
    assert float(total.detach()) == pytest.approx(float(nll[keep.reshape(-1)].sum()), rel=1e-5)
