"""What an objective is, what it returns, and how objectives compose into one loss.

An objective is a callable on `ForwardOutputs` (one micro-batch's student and teacher forward) returning a
scalar tensor; each has its own config dataclass and registers under one name (`register_objective`).
`--loss kl+cka` names a `Composite`: the first term has weight 1, the CKA term weight λ (fixed, or `auto`:
λ = α · stopgrad(first / cka), docs/method.md#cka-qad-loss), a CE term its `--ce-weight`, a router-kl term its
`--router-kl-weight`. The result is a `LossParts` of
tensors: nothing here moves a value to the host; the trainer does that once per step, when it logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

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
    student_routers: dict = field(default_factory=dict)
    """{block index: capture.RouterStates} of the student's MoE routers at every token (router-kl only)"""
    teacher_routers: dict = field(default_factory=dict)
    """the teacher's, likewise"""


@dataclass
class LossParts:
    """The loss of one micro-batch and its terms, all tensors (None for a term not in the objective)."""

    loss: torch.Tensor
    kl: torch.Tensor | None = None
    cka_term: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    cka_weight: torch.Tensor | None = None
    cka_layers: torch.Tensor | None = None  # (L,) CKA of each layer pair
    router_kl: torch.Tensor | None = None


class Objective(Protocol):
    needs_states: bool

    def __call__(self, out: ForwardOutputs) -> torch.Tensor: ...


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
