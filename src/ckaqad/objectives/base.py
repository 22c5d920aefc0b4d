"""What an objective is, what it returns, and how objectives compose into one loss.

An objective is a callable on `ForwardOutputs` (one micro-batch's student and teacher forward) returning a
scalar tensor; each has its own config dataclass and registers under one name (`register_objective`).
`--loss kl+cka` names a `Composite`: the first term has weight 1, the CKA term weight λ (fixed, or `auto`:
λ = α · stopgrad(first / cka), docs/method.md#cka-qad-loss), a CE term its `--ce-weight`. The result is a `LossParts` of
tensors: nothing here moves a value to the host; the trainer does that once per step, when it logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ckaqad.errors import ConfigError
from ckaqad.registry import Registry

DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class ForwardOutputs:
    """One micro-batch: logits `(B, T, V)`, the batch (`input_ids`, `attention_mask`), and the captured
    hidden states `{pair index: (m, d)}` of student and teacher at the sampled rows (empty when no
    objective needs them). Under torchrun the batch and the rows are this rank's slice of the global batch."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    batch: dict[str, torch.Tensor]
    student_states: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher_states: dict[int, torch.Tensor] = field(default_factory=dict)
    row_counts: list[int] | None = None
    """under torchrun, every rank's number of sampled state rows (the CKA term gathers them); else None"""


@dataclass
class LossParts:
    """The loss of one micro-batch and its named parts, all tensors.

    `terms` maps each term's metric name (the metrics.jsonl key: kl, cka_term, ce, cosine_term, mse_term) to
    its value; `weights` each weight's metric name (cka_weight, cosine_weight, mse_weight) to the weight the
    term got; `cka_layers` is the (L,) CKA of each layer pair when the CKA term ran. A new term adds names, not
    fields. `kl`, `cka_term`, `ce` and `cka_weight` read the mapping (None for a term not in the objective)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    cka_layers: torch.Tensor | None = None  # (L,) CKA of each layer pair

    @property
    def kl(self) -> torch.Tensor | None:
        return self.terms.get("kl")

    @property
    def cka_term(self) -> torch.Tensor | None:
        return self.terms.get("cka_term")

    @property
    def ce(self) -> torch.Tensor | None:
        return self.terms.get("ce")

    @property
    def cka_weight(self) -> torch.Tensor | None:
        return self.weights.get("cka_weight")


def parse_term_weight(flag: str, value: str) -> str:
    """A term's `--X-weight`: 'auto', or a non-negative number normalised to its float text."""
    if value == "auto":
        return value
    try:
        weight = float(value)
    except ValueError as exc:
        raise ConfigError(f"{flag} must be 'auto' or a number, got {value!r}") from exc
    if weight < 0:
        raise ConfigError(f"{flag} must be non-negative, got {weight}")
    return str(weight)


def balanced_weight(weight: str, alpha: float, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
    """The weight of a term balanced against the objective's first term: the fixed number, or with `auto`
    λ = α · stopgrad(first / term), so the term keeps a share α of the first term (docs/method.md#cka-qad-loss)."""
    if weight == "auto":
        return alpha * (first.detach() / value.detach().clamp_min(1e-12))
    return float(weight)


class Objective(Protocol):
    needs_states: bool
    metric: str
    """the term's name in LossParts.terms and metrics.jsonl"""
    weight_metric: str | None
    """the name its weight is logged under (None: not logged)"""

    def __call__(self, out: ForwardOutputs) -> torch.Tensor: ...

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
        """The term's weight when it is not the objective's first term (the first has weight 1)."""


@dataclass(frozen=True)
class ObjectiveEntry:
    config_class: type
    factory: Callable[..., Objective]


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective", flag="--loss")


def register_objective(name: str, config_class: type) -> Callable[[type], type]:
    """Class decorator: register an objective under `name`, built from an instance of `config_class`."""

    def decorate(cls: type) -> type:
        OBJECTIVES.register(name, ObjectiveEntry(config_class, cls))
        return cls

    return decorate
