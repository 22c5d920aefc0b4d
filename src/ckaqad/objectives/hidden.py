"""The intermediate-layer baselines CKA-QAD is compared with: per-token cosine distance and MSE of hidden states.

These are what ModelOpt's and Megatron's intermediate-layer distillation apply to the hidden states of chosen
layer pairs: `hidden-cosine` is mean(1 − cos(student_i, teacher_i)) over tokens i (ModelOpt's
`HiddenStateCosineLoss`), `hidden-mse` the mean squared difference over tokens and features. Here they run on
the same captured layer pairs and sampled token rows as the CKA term (`--layers`, `--cka-tokens`), so the
three regularizers see exactly the same tokens, and each is balanced against the first term the same way
(λ = α · stopgrad(KL / term) with `auto`). Unlike CKA, both compare the states coordinate by coordinate, so the
student's and teacher's widths must agree. FP32 with autocast off, like the CKA term.

Under torchrun each rank sums its own rows over the global row count and the shares are summed over ranks
(`ranks.sum_over_ranks`): the value is the one-process value on every rank, and each rank's rows receive their
part of the one-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import ForwardOutputs, balanced_weight, parse_term_weight, register_objective
from ckaqad.objectives.ranks import distributed, sum_over_ranks


def _per_token_term(per_row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str,
                    student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor],
                    row_counts: list[int] | None) -> torch.Tensor:
    """mean over layer pairs of mean over (global) rows of `per_row(x, y)` (n,), as this rank's share."""
    if not student_states:
        raise ConfigError(f"the {name} term needs at least one layer")
    rows = next(iter(student_states.values()))
    total_rows = sum(row_counts) if row_counts is not None and distributed() else rows.shape[0]
    if total_rows == 0:
        raise ConfigError(f"the {name} term needs at least one token row")
    with torch.autocast(device_type=rows.device.type, enabled=False):
        shares = []
        for key, x in student_states.items():
            y = teacher_states[key]
            if x.shape[-1] != y.shape[-1]:
                raise ConfigError(f"the {name} term compares hidden states coordinate by coordinate, but student "
                                  f"block {key} has width {x.shape[-1]} and its teacher block {y.shape[-1]}; "
                                  "use the cka term for students of another width")
            shares.append(per_row(x.float(), y.float()).sum() / total_rows)
        share = torch.stack(shares).mean()
    return sum_over_ranks(share) if row_counts is not None and distributed() else share


def cosine_distance_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − cos(x_i, y_i) for each row (torch's cosine_similarity: norms clamped at 1e-8)."""
    return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)


def squared_error_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over features of (x_i − y_i)² for each row."""
    return (x - y).square().mean(dim=-1)


def hidden_cosine_term(student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor],
                       row_counts: list[int] | None = None) -> torch.Tensor:
    """mean_l mean_i (1 − cos(s_li, t_li)) over the layer pairs l and sampled token rows i."""
    return _per_token_term(cosine_distance_rows, "hidden-cosine", student_states, teacher_states, row_counts)


def hidden_mse_term(student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor],
                    row_counts: list[int] | None = None) -> torch.Tensor:
    """mean_l mean_i mean_k (s_lik − t_lik)² over layer pairs, sampled token rows and features."""
    return _per_token_term(squared_error_rows, "hidden-mse", student_states, teacher_states, row_counts)


@dataclass
class HiddenCosineConfig:
    cosine_weight: str = "auto"
    """λ of the hidden-cosine term: a number, or auto (λ = α·KL/term each step, detached)"""
    cosine_alpha: float = 1.0
    """α of the auto weight: the hidden-cosine term's share of the KL term"""

    def __post_init__(self) -> None:
        self.cosine_weight = parse_term_weight("--cosine-weight", self.cosine_weight)
        if self.cosine_alpha < 0:
            raise ConfigError(f"--cosine-alpha must be non-negative, got {self.cosine_alpha}")


@dataclass
class HiddenMSEConfig:
    mse_weight: str = "auto"
    """λ of the hidden-mse term: a number, or auto (λ = α·KL/term each step, detached)"""
    mse_alpha: float = 1.0
    """α of the auto weight: the hidden-mse term's share of the KL term"""

    def __post_init__(self) -> None:
        self.mse_weight = parse_term_weight("--mse-weight", self.mse_weight)
        if self.mse_alpha < 0:
            raise ConfigError(f"--mse-alpha must be non-negative, got {self.mse_alpha}")


@register_objective("hidden-cosine", HiddenCosineConfig)
class HiddenCosineObjective:
    """mean over layer pairs and sampled tokens of the cosine distance of hidden states."""

    needs_states = True
    metric = "cosine_term"
    weight_metric = "cosine_weight"

    def __init__(self, config: HiddenCosineConfig) -> None:
        self.config = config

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        return hidden_cosine_term(out.student_states, out.teacher_states, out.row_counts)

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
        return balanced_weight(self.config.cosine_weight, self.config.cosine_alpha, value, first)


@register_objective("hidden-mse", HiddenMSEConfig)
class HiddenMSEObjective:
    """mean over layer pairs, sampled tokens and features of the squared difference of hidden states."""

    needs_states = True
    metric = "mse_term"
    weight_metric = "mse_weight"

    def __init__(self, config: HiddenMSEConfig) -> None:
        self.config = config

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        return hidden_mse_term(out.student_states, out.teacher_states, out.row_counts)

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
        return balanced_weight(self.config.mse_weight, self.config.mse_alpha, value, first)
