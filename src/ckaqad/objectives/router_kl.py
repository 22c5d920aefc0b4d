"""The routing term (`--loss kl+cka+router-kl`, docs/moe_export.md#routing-drift): mean over the MoE layers
of the mean KL(teacher ‖ student) per real token between the routers' distributions over experts.

A router's distribution is softmax(logits) for softmax routers (qwen3_moe, mixtral, gpt_oss) and the
normalised sigmoid scores `σ(l) / Σ σ(l)` for sigmoid routers (deepseek_v3, nemotron_h), whose correction
bias moves only which experts are chosen (`capture.ROUTER_KINDS`). The gradient reaches the student's
router logits, so it trains what feeds the routers (the quantized layers upstream) to route as the teacher
does; the routers themselves stay frozen in high precision by default.

>>> t = torch.tensor([[2.0, 0.0, -1.0]])
>>> float(router_kl_per_token(t, t, "softmax")[0])
0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ckaqad.capture import ROUTER_KINDS, RouterStates
from ckaqad.errors import ConfigError, ModelError
from ckaqad.objectives.base import ForwardOutputs, register_objective
from ckaqad.objectives.ranks import distributed, global_count, sum_over_ranks


def router_log_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Log-probabilities over experts `(N, E)`, float32, of router logits `(N, E)` (module docstring)."""
    if kind not in ROUTER_KINDS:
        raise ConfigError(f"router kind {kind!r} is not one of {ROUTER_KINDS}")
    logits = logits.float()
    if kind == "softmax":
        return F.log_softmax(logits, dim=-1)
    log_scores = F.logsigmoid(logits)
    return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)


def router_kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(teacher ‖ student) of the router distributions at each of N tokens, float32 `(N,)`, nats."""
    log_p = router_log_probs(teacher_logits.detach(), kind)
    log_q = router_log_probs(student_logits, kind)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def router_kl_term(student: dict[int, RouterStates], teacher: dict[int, RouterStates],
                   mask: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """mean over layers of (Σ over the tokens in `mask` of the router KL) / `count` (default: the mask's token
    count). `mask` is `(N,)` or any shape with N elements, over the captured rows."""
    if not student:
        raise ModelError("the router-kl term needs an MoE model: the student has no routers")
    if set(student) != set(teacher):
        raise ModelError(f"student routers {sorted(student)} and teacher routers {sorted(teacher)} differ")
    values = []
    for index, s in student.items():
        kl = router_kl_per_token(teacher[index].logits, s.logits, s.kind)
        weights = torch.ones_like(kl) if mask is None else mask.reshape(-1).to(kl)
        n = weights.sum() if count is None else count.to(kl)
        values.append((kl * weights).sum() / n.clamp_min(1.0))
    return torch.stack(values).mean()


@dataclass
class RouterKLConfig:
    router_kl_weight: float = 1.0
    """weight of the router-kl term (KL between teacher and student router distributions, mean over MoE layers)"""

    def __post_init__(self) -> None:
        if self.router_kl_weight < 0:
            raise ConfigError(f"--router-kl-weight must be non-negative, got {self.router_kl_weight}")


@register_objective("router-kl", RouterKLConfig)
class RouterKLObjective:
    """Mean over MoE layers of the mean router KL(teacher ‖ student) per real token of the micro-batch."""

    needs_states = False
    needs_routers = True
    metric = "router_kl"
    weight_metric = None

    def __init__(self, config: RouterKLConfig) -> None:
        self.config = config

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        mask = out.batch.get("attention_mask")
        if not distributed():
            return router_kl_term(out.student_routers, out.teacher_routers, mask)
        # Under torchrun: this rank's tokens over the global token count, summed over ranks (as the KL term).
        device = out.student_logits.device
        local = out.student_logits[..., 0].numel() if mask is None else mask.sum()
        count = global_count(torch.as_tensor(local, device=device))
        return sum_over_ranks(router_kl_term(out.student_routers, out.teacher_routers, mask, count))

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> float:
        return self.config.router_kl_weight
