"""tests for ckaqad/objectives/router_kl.py: the router-kl term against a direct formula (values and gradients),
its composition under `--loss`, and the router capture it reads on every MoE family."""

from __future__ import annotations

import pytest
import torch

from ckaqad.capture import RouterCapture, RouterStates
from ckaqad.errors import ConfigError, ModelError
from ckaqad.objectives.base import ForwardOutputs
from ckaqad.objectives.compose import Composite, ObjectiveConfig
from ckaqad.objectives.router_kl import RouterKLConfig, router_kl_per_token, router_kl_term
from tests.moe_helpers import MOE_FAMILIES as FAMILIES
from tests.moe_helpers import make_tiny_moe as tiny_moe


def direct_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Σ_e p_e log(p_e / q_e) per token in float64, from probabilities (not log-probabilities)."""
    def probs(logits):
        logits = logits.double()
        if kind == "softmax":
            return torch.softmax(logits, -1)
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True)

    p, q = probs(teacher_logits), probs(student_logits)
    return (p * (p / q).log()).sum(-1)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_router_kl_equals_the_direct_formula_in_value_and_gradient(kind):
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(40, 8, generator=g) * 2
    student = (teacher + 0.5 * torch.randn(40, 8, generator=g)).requires_grad_(True)
    mine = router_kl_per_token(teacher, student, kind)
    want = direct_kl(teacher, student, kind)
    assert torch.allclose(mine.double(), want, rtol=1e-5, atol=1e-6)
    (grad_mine,) = torch.autograd.grad(mine.sum(), student)
    (grad_want,) = torch.autograd.grad(direct_kl(teacher, student, kind).sum(), student)
    assert torch.allclose(grad_mine.double(), grad_want.double(), rtol=1e-4, atol=1e-6)
    assert (mine >= -1e-7).all() and torch.equal(router_kl_per_token(teacher, teacher, kind), torch.zeros(40))


def test_router_kl_term_is_the_masked_mean_over_tokens_then_layers():
    g = torch.Generator().manual_seed(0)
    states = {i: (torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)) for i in (1, 3)}
    chosen = torch.zeros(6, 2, dtype=torch.long)
    student = {i: RouterStates(s, chosen, "softmax") for i, (s, _) in states.items()}
    teacher = {i: RouterStates(t, chosen, "softmax") for i, (_, t) in states.items()}
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    want = torch.stack([direct_kl(t, s, "softmax")[mask.flatten().bool()].mean() for s, t in states.values()]).mean()
    assert torch.allclose(router_kl_term(student, teacher, mask).double(), want, rtol=1e-5)
    with pytest.raises(ModelError, match="no routers"):
        router_kl_term({}, {})
    with pytest.raises(ModelError, match="differ"):
        router_kl_term(student, {1: teacher[1]})


def test_router_kl_config_rejects_a_negative_weight():
    with pytest.raises(ConfigError, match="--router-kl-weight"):
        RouterKLConfig(router_kl_weight=-1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_composite_kl_plus_router_kl_on_each_family(family):
    """`--loss kl+router-kl`: KL + w·router-kl, with the router captures of a real model; zero on itself, and its
    gradient reaches the student's weights upstream of the routers."""
    teacher, student = tiny_moe(family, seed=0), tiny_moe(family, seed=0)
    with torch.no_grad():  # perturb the student's first block so that its routers move
        for p in list(student.model.layers[0].parameters()):
            p.add_(0.05 * torch.randn_like(p))
    batch = {"input_ids": torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    objective = Composite(ObjectiveConfig(loss="kl+router-kl", router_kl=RouterKLConfig(router_kl_weight=0.5)))
    assert objective.needs_routers and not objective.needs_states
    with RouterCapture(teacher, detach=True) as t_cap, RouterCapture(student) as s_cap:
        with torch.no_grad():
            t_logits = teacher(**batch).logits
        s_logits = student(**batch).logits
        s_routers, t_routers = s_cap.take(), t_cap.take()
    parts = objective(ForwardOutputs(s_logits, t_logits, batch, student_routers=s_routers, teacher_routers=t_routers))
    direct = torch.stack([direct_kl(t_routers[i].logits, s.logits, s.kind)[batch["attention_mask"].flatten().bool()]
                          .mean() for i, s in s_routers.items()]).mean()
    assert torch.allclose(parts.terms['router_kl'].double(), direct, rtol=1e-5) and parts.terms['router_kl'] > 0
    assert torch.allclose(parts.loss, parts.kl + 0.5 * parts.terms['router_kl'])
    parts.terms['router_kl'].backward()
    grads = [p.grad for p in student.model.layers[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with RouterCapture(teacher, detach=True) as a, RouterCapture(teacher, detach=True) as b, torch.no_grad():
        teacher(**batch)
        assert float(router_kl_term(a.take(), b.take(), batch["attention_mask"])) == 0.0
