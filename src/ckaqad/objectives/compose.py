"""`--loss A+B+...`: the objective of a run as a composition of registered terms (base.py explains the
weights). `ObjectiveConfig` holds the composition and each term's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import OBJECTIVES, ForwardOutputs, LossParts
from ckaqad.objectives.ce import CEConfig
from ckaqad.objectives.cka import CKAConfig
from ckaqad.objectives.hidden import HiddenCosineConfig, HiddenMSEConfig
from ckaqad.objectives.kl import KLConfig


@dataclass
class ObjectiveConfig:
    loss: str = "kl+cka"
    """objective: terms joined by + from kl, cka, ce, hidden-cosine, hidden-mse (kl: KL-only QAD; kl+cka: CKA-QAD)"""
    kl: KLConfig = field(default_factory=KLConfig)
    cka: CKAConfig = field(default_factory=CKAConfig)
    ce: CEConfig = field(default_factory=CEConfig)
    hidden_cosine: HiddenCosineConfig = field(default_factory=HiddenCosineConfig)
    hidden_mse: HiddenMSEConfig = field(default_factory=HiddenMSEConfig)

    def __post_init__(self) -> None:
        names = self.terms
        for name in names:
            OBJECTIVES.check(name)
        if len(set(names)) != len(names):
            raise ConfigError(f"--loss {self.loss!r} names a term twice")

    @property
    def terms(self) -> list[str]:
        """The term names in order; `--ce-weight > 0` adds a CE term to an objective that does not list it."""
        names = [t.strip() for t in self.loss.split("+") if t.strip()]
        if not names:
            raise ConfigError("--loss must name at least one term (kl, cka, ce)")
        if self.ce.ce_weight > 0 and "ce" not in names:
            names.append("ce")
        return names

    @property
    def uses_cka(self) -> bool:
        return "cka" in self.terms

    @property
    def uses_kl(self) -> bool:
        return "kl" in self.terms

    @property
    def uses_states(self) -> bool:
        """Whether any term reads hidden states at the sampled token rows (cka, hidden-cosine, hidden-mse)."""
        return any(OBJECTIVES.get(name).factory.needs_states for name in self.terms)

    def term_config(self, name: str):
        return getattr(self, name.replace("-", "_"))


class Composite:
    """Σ wᵢ·termᵢ: the first term with weight 1, each later term with its own `weight` (λ for cka,
    hidden-cosine and hidden-mse; `--ce-weight` for ce; 1 for kl). See the module docstring of base.py."""

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config
        self.terms = [(name, OBJECTIVES.get(name).factory(config.term_config(name))) for name in config.terms]

    @property
    def needs_states(self) -> bool:
        return any(term.needs_states for _, term in self.terms)

    def __call__(self, out: ForwardOutputs) -> LossParts:
        values: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor | float] = {"cka_weight": 0.0}  # logged 0 when there is no CKA term
        loss = first = None
        for index, (_, term) in enumerate(self.terms):
            value = term(out)
            values[term.metric] = value
            if index == 0:
                loss = first = value
                weight: torch.Tensor | float = 1.0
            else:
                weight = term.weight(value, first)
                loss = loss + weight * value
            if term.weight_metric is not None:
                weights[term.weight_metric] = weight
        layers = next((t.last_layers for n, t in self.terms if n == "cka"), None)
        return LossParts(loss=loss, terms=values, cka_layers=layers,
                         weights={k: torch.as_tensor(w, dtype=torch.float32) for k, w in weights.items()})
