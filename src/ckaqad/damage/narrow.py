"""The optional CE term of recovering a forgetting: keep the narrow skill while the general ability returns.

Distillation to the original model pulls the student back towards the teacher everywhere, including on the
narrow task the fine-tune learnt. `NarrowCE` wraps the run's objective: each micro-batch it adds
`weight · CE(student, narrow batch)`, a next-token cross-entropy on a batch of the narrow corpus of the same
shape as the distillation batch (so the student's CKA hooks, which fire on this extra forward too, keep
valid row indices; their states are already taken when it runs). The narrow batches follow the trainer's
(seed, step) order with their own seed. The logged `ce` is this narrow CE.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ckaqad.data.blocks import train_batches
from ckaqad.errors import ConfigError
from ckaqad.objectives.base import ForwardOutputs, LossParts
from ckaqad.objectives.ce import next_token_nll
from ckaqad.objectives.compose import Composite
from ckaqad.train.trainer import autocast

# Offset of the narrow stream's seed from the run's, so the two data orders are independent.
NARROW_SEED_OFFSET = 7919


class NarrowCE:
    """`base(out) + weight · CE(student, next narrow batch)`; quacks like the trainer's `Composite`."""

    def __init__(self, base: Composite, student: nn.Module, narrow_train: torch.Tensor, batch_size: int,
                 weight: float, seed: int, start: int = 0) -> None:
        if "ce" in base.config.terms:
            raise ConfigError("--narrow-ce-weight replaces the objective's ce term; drop ce from --loss "
                              "(or --ce-weight) when recovering with the narrow CE term")
        if weight <= 0:
            raise ConfigError(f"--narrow-ce-weight must be positive, got {weight}")
        self.base = base
        self.config = base.config
        self.student = student
        self.weight = weight
        self._batches = train_batches(narrow_train, batch_size, seed + NARROW_SEED_OFFSET, start=start,
                                      device=next(student.parameters()).device)

    @property
    def needs_states(self) -> bool:
        return self.base.needs_states

    def __call__(self, out: ForwardOutputs) -> LossParts:
        parts = self.base(out)
        batch = next(self._batches)
        with autocast(batch["input_ids"].device):
            logits = self.student(**batch).logits
        nll, count = next_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        ce = nll / max(count, 1)
        return dataclasses.replace(parts, loss=parts.loss + self.weight * ce, terms={**parts.terms, "ce": ce})
