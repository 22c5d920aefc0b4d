"""Turning a model into a fake-quantized student and managing its scales.

`quantize_model_` swaps Linear layers for `QuantLinear` and groups fused siblings; `calibrate` max-calibrates
activation amaxes and freezes them; `freeze_scales` writes every amax the forward uses into buffers (so an
export can read scales from a state dict); `cached_quantized_weights` holds the quantized weights during an
evaluation. Scales (docs/method.md#nvfp4-and-the-comparison-formats): weight block scales are recomputed from
the current weight every forward; the weight global scale is recomputed too (`weight_global="dynamic"`,
torchao's choice) or frozen after calibration (`"frozen"`, ModelOpt's). Activation global scales come from
max-calibration and are frozen. Fused siblings (q/k/v, gate/up) share one weight and one input global scale,
because vLLM fuses them into one GEMM with one scale.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.errors import ConfigError
from ckaqad.quant.linear import FUSED_SIBLINGS, QuantConfig, QuantLinear, SiblingGroup, StepQuantizedWeights


@dataclass
class QuantReport:
    """What the student quantized and what it left in high precision (with the reason)."""

    format: str
    scheme: str
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    quantized_params: int = 0
    total_linear_params: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        share = self.quantized_params / max(self.total_linear_params, 1)
        lines = [f"{self.format} {self.scheme}: {len(self.quantized)} Linear layers quantized "
                 f"({self.quantized_params:,} of {self.total_linear_params:,} Linear parameters, {share:.1%}), "
                 f"{len(self.groups)} fused sibling groups"]
        for name, reason in self.excluded.items():
            lines.append(f"  kept in high precision: {name} ({reason})")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


def _exclusion_reason(name: str, linear: nn.Linear, config: QuantConfig) -> str | None:
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern):
            return f"excluded by pattern {pattern!r}"
    if linear.in_features % config.block_size:
        return f"input dim {linear.in_features} is not a multiple of the {config.format} block {config.block_size}"
    return None


def quantize_model_(model: nn.Module, config: QuantConfig, only: Iterable[str] | None = None) -> QuantReport:
    """Swap the model's Linear layers for QuantLinear in place; return what was done.

    `only`: quantize exactly these module names (a saved student's list) instead of applying the config's
    exclusion rules.
    """
    report = QuantReport(format=config.format, scheme=config.scheme)
    only = None if only is None else set(only)
    swapped: dict[str, QuantLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        report.total_linear_params += module.weight.numel()
        reason = _exclusion_reason(name, module, config) if only is None else \
            (None if name in only else "not quantized in the saved student")
        if reason:
            report.excluded[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        qlinear = QuantLinear(module, config)
        setattr(parent, child, qlinear)
        swapped[name] = qlinear
        report.quantized.append(name)
        report.quantized_params += module.weight.numel()
    for parent_name in sorted({n.rpartition(".")[0] for n in swapped}):
        for siblings in FUSED_SIBLINGS:
            names = [f"{parent_name}.{s}" if parent_name else s for s in siblings]
            if all(n in swapped for n in names):
                SiblingGroup([swapped[n] for n in names])
                report.groups.append(names)
    return report


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def calibrate(student: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Max-calibrate input global amaxes (W4A4) and freeze them; freeze weight amaxes if configured.

    `batches` yields model kwargs (input_ids, attention_mask) already on the student's device. Padding
    tokens pass through the Linear layers too; they come from real embeddings, so they do not inflate amax
    beyond what the model produces. Returns the number of batches used.
    """
    layers = quant_linears(student)
    # Frozen weight amaxes first: the calibration forward quantizes the weights with them (zero amaxes would
    # quantize every weight to 0 and starve the later layers' activation amaxes).
    for m in layers.values():
        if m.frozen_weight_global and m.uses_global_scale:
            m.weight_amax.copy_(m.current_weight_amax())
    needs_inputs = [m for m in layers.values() if m.quantize_input and m.uses_global_scale]
    used = 0
    if needs_inputs:
        for m in needs_inputs:
            m.input_amax.zero_()
            m.calibrating = True
        try:
            for batch in batches:
                student(**batch)
                used += 1
        finally:
            for m in needs_inputs:
                m.calibrating = False
        if used == 0:
            raise ConfigError("calibration needs at least one batch of data")
    for m in needs_inputs:
        m.input_amax.copy_(m.global_amax(m.input_amax))
    groups = {id(m.group): m.group for m in layers.values() if m.group is not None}
    for group in groups.values():
        if group.members[0].quantize_input:
            group.share_input_amax()
    return used


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig the model's QuantLinear layers were built with (None for an unquantized model)."""
    layers = quant_linears(model)
    return next(iter(layers.values())).config if layers else None


@torch.no_grad()
def freeze_scales(model: nn.Module) -> None:
    """Write every global amax the forward uses into buffers: `weight_amax` (group-wide for siblings, the
    dynamic amax of the current weight otherwise), so `export.compress` can work from a state dict alone."""
    for m in quant_linears(model).values():
        amax = m.weight_global_amax()
        if amax is not None:
            m.weight_amax.copy_(amax)


@contextlib.contextmanager
def cached_quantized_weights(*models: nn.Module) -> Iterator[None]:
    """Quantize each QuantLinear's weight once for the duration of the block (evaluation, generation), and
    drop the copies afterwards. The weights must not change inside the block."""
    layers = [m for model in models for m in quant_linears(model).values()]
    held = [m for m in layers if m._held_weight is None]  # nested use keeps the outer copies
    for m in held:
        m.hold_quantized_weight()
    try:
        yield
    finally:
        for m in held:
            m.release_quantized_weight()


@contextlib.contextmanager
def weights_quantized_once_per_step(model: nn.Module) -> Iterator[None]:
    """Every quantized module of `model` (any `StepQuantizedWeights`: QuantLinear, fused experts) quantizes
    each weight once inside the block and reuses it across the block's forwards, with gradients that equal
    quantizing per forward. The trainer opens it around the micro-batches of one optimizer step; leaving it
    (before `optimizer.step()`) drops the held weights, so the next step quantizes the updated ones."""
    modules = [m for m in model.modules() if isinstance(m, StepQuantizedWeights)]
    for m in modules:
        m.begin_step_cache()
    try:
        yield
    finally:
        for m in modules:
            m.end_step_cache()
