"""`--loss A+B+...`: the objective of a run as a composition of registered terms (base.py explains the
weights). `ObjectiveConfig` holds the composition and each term's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import OBJECTIVES, ForwardOutputs, LossParts
from ckaqad.objectives.ce import CEConfig
from ckaqad.objectives.cka import CKAConfig
from ckaqad.objectives.kl import KLConfig
from ckaqad.objectives.router_kl import RouterKLConfig

# LossParts field of each term (metrics.jsonl keys).
TERM_FIELDS = {"kl": "kl", "cka": "cka_term", "ce": "ce", "router-kl": "router_kl"}


@dataclass
class ObjectiveConfig:
    loss: str = "kl+cka"
    """objective: terms joined by + from kl, cka, ce, router-kl (kl: KL-only QAD; kl+cka: CKA-QAD)"""
    kl: KLConfig = field(default_factory=KLConfig)
    cka: CKAConfig = field(default_factory=CKAConfig)
    ce: CEConfig = field(default_factory=CEConfig)
    router_kl: RouterKLConfig = field(default_factory=RouterKLConfig)

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

    def term_config(self, name: str):
        return {"kl": self.kl, "cka": self.cka, "ce": self.ce, "router-kl": self.router_kl}[name]


class Composite:
    """Σ wᵢ·termᵢ: the first term with weight 1, CKA with λ, CE with `--ce-weight`, router-kl with
    `--router-kl-weight` (module docstring)."""

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config
        self.terms = [(name, OBJECTIVES.get(name).factory(config.term_config(name))) for name in config.terms]

    @property
    def needs_states(self) -> bool:
        return any(term.needs_states for _, term in self.terms)

    @property
    def needs_routers(self) -> bool:
        """Whether a term reads the routers' logits (`ForwardOutputs.student_routers`)."""
        return any(getattr(term, "needs_routers", False) for _, term in self.terms)

    def _weight(self, name: str, value: torch.Tensor, first: torch.Tensor) -> torch.Tensor | float:
        if name == "cka":
            cka = self.config.cka
            if cka.cka_weight == "auto":
                return cka.cka_alpha * (first.detach() / value.detach().clamp_min(1e-12))
            return float(cka.cka_weight)
        if name == "ce":
            return self.config.ce.ce_weight
        if name == "router-kl":
            return self.config.router_kl.router_kl_weight
        return 1.0

    def __call__(self, out: ForwardOutputs) -> LossParts:
        values: dict[str, torch.Tensor] = {}
        loss = first = None
        cka_weight: torch.Tensor | float = 0.0
        for index, (name, term) in enumerate(self.terms):
            value = term(out)
            values[TERM_FIELDS[name]] = value
            if index == 0:
                loss = first = value
                cka_weight = 1.0 if name == "cka" else cka_weight
                continue
            weight = self._weight(name, value, first)
            if name == "cka":
                cka_weight = weight
            loss = loss + weight * value
        layers = next((t.last_layers for n, t in self.terms if n == "cka"), None)
        return LossParts(loss=loss, cka_weight=torch.as_tensor(cka_weight, dtype=torch.float32), cka_layers=layers,
                         **values)
