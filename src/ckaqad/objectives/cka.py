"""The CKA regularizer of CKA-QAD (docs/method.md#cka-qad-loss): mean over the chosen layer pairs of 1 − linear
CKA between student and teacher hidden states at the sampled token rows, in FP32 with autocast off (bf16 Gram
products lose the 1e-3 differences CKA-QAD cares about)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckaqad.cka import distributed_linear_cka, linear_cka
from ckaqad.errors import ConfigError
from ckaqad.objectives.base import ForwardOutputs, balanced_weight, parse_term_weight, register_objective
from ckaqad.objectives.ranks import distributed


def cka_term(student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor],
             row_counts: list[int] | None = None, debiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_l (1 − CKA_l), the (L,) tensor of each pair's CKA) over the keys of `student_states`.

    `row_counts` (under torchrun: every rank's number of sampled rows) makes each CKA the one of the union of
    all ranks' rows (`cka.distributed_linear_cka`), the same value on every rank. `debiased`: the CKA of the
    unbiased HSIC estimator (Nguyen et al. 2021), which does not drift up with few rows per feature."""
    if not student_states:
        raise ConfigError("the CKA term needs at least one layer")
    device_type = next(iter(student_states.values())).device.type

    def one(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if row_counts is None or not distributed():
            return linear_cka(x, y, debiased=debiased)
        return distributed_linear_cka(x, y, row_counts, debiased=debiased)

    with torch.autocast(device_type=device_type, enabled=False):
        values = torch.stack([one(x.float(), teacher_states[key].float()) for key, x in student_states.items()])
    return (1.0 - values).mean(), values.detach()


@dataclass
class CKAConfig:
    cka_weight: str = "auto"
    """λ: a number, or auto (λ = α·KL/CKA each step, detached)"""
    cka_alpha: float = 1.0
    """α of the auto weight: the CKA term's share of the KL term"""
    cka_debiased: bool = False
    """the debiased CKA (unbiased HSIC estimator) in the CKA term instead of the biased one"""

    def __post_init__(self) -> None:
        self.cka_weight = parse_term_weight("--cka-weight", self.cka_weight)
        if self.cka_alpha < 0:
            raise ConfigError(f"--cka-alpha must be non-negative, got {self.cka_alpha}")


@register_objective("cka", CKAConfig)
class CKAObjective:
    """mean_l (1 − CKA_l) over the captured layer pairs; `last_layers` keeps each pair's CKA."""

    needs_states = True
    metric = "cka_term"
    weight_metric = "cka_weight"

    def __init__(self, config: CKAConfig) -> None:
        self.config = config
        self.last_layers: torch.Tensor | None = None

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        term, self.last_layers = cka_term(out.student_states, out.teacher_states, out.row_counts,
                                          debiased=self.config.cka_debiased)
        return term

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
        return balanced_weight(self.config.cka_weight, self.config.cka_alpha, value, first)
