"""Building the fake-quantized student: swap Linear layers, calibrate activation scales, group fused siblings.

Scales (METHOD.md §2): weight block scales are recomputed from the current weight every forward; the
weight global scale is recomputed too (`weight_global="dynamic"`, torchao's choice) or frozen after
calibration (`"frozen"`, ModelOpt's). Activation global scales come from max-calibration on a few batches
and are then frozen. Fused siblings (q/k/v, gate/up) share one weight and one input global scale, because
vLLM fuses them into one GEMM with one scale.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ckaqad.errors import ConfigError, unknown_name
from ckaqad.formats import CALIBRATED_FORMATS, FORMATS, get_format

# scheme -> quantize activations (inputs of Linear layers)?  Weights are always quantized.
SCHEMES: dict[str, bool] = {"w4a16": False, "w4a4": True}
WEIGHT_GLOBAL_MODES = ("dynamic", "frozen")
# Modules left in high precision by default: the output head and MoE routers (embeddings and norms are
# not Linear layers, so they are never swapped).
DEFAULT_EXCLUDE = ("lm_head", "*.router", "*.gate")
# Linear layers that serving engines fuse into one GEMM; they must share global scales.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass
class QuantConfig:
    format: str = "nvfp4"
    """number format of the student: nvfp4, mxfp4 or int4"""
    scheme: str = "w4a4"
    """w4a4 quantizes weights and Linear inputs; w4a16 only weights"""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """fnmatch patterns of module names kept in high precision"""
    calib_batches: int = 4
    """batches of max-calibration for activation global scales"""
    weight_global: str = "dynamic"
    """weight global scale: dynamic (recomputed each forward) or frozen (fixed at calibration)"""
    clip_gradient: bool = False
    """zero the straight-through gradient where |x| exceeds the global amax"""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise unknown_name("format (--format)", self.format, FORMATS)
        if self.scheme not in SCHEMES:
            raise unknown_name("scheme (--scheme)", self.scheme, SCHEMES)
        if self.weight_global not in WEIGHT_GLOBAL_MODES:
            raise unknown_name("weight global mode (--weight-global)", self.weight_global, WEIGHT_GLOBAL_MODES)
        if self.calib_batches < 1:
            raise ConfigError(f"--calib-batches must be at least 1, got {self.calib_batches}")
        self.exclude = tuple(self.exclude)

    @property
    def quantize_inputs(self) -> bool:
        return SCHEMES[self.scheme]

    @property
    def block_size(self) -> int:
        return get_format(self.format).BLOCK_SIZE


class SiblingGroup:
    """Fused siblings sharing global scales. Not a Module, so its members are not registered twice."""

    def __init__(self, members: list[QuantLinear]) -> None:
        self.members = members
        self._key: tuple | None = None
        self._weight_amax: torch.Tensor | None = None
        # q/k/v (gate/up) receive the same input tensor: quantize it once per forward.
        self.last_input: tuple[torch.Tensor, torch.Tensor] | None = None
        for member in members:
            member.group = self

    def weight_amax(self) -> torch.Tensor:
        # Recomputed only when a member's weight changed (optimizer steps bump the tensor version).
        key = tuple((m.weight._version, m.weight.data_ptr()) for m in self.members)
        if key != self._key:
            self._weight_amax = torch.stack([m.weight.detach().abs().amax().float() for m in self.members]).amax()
            self._key = key
        return self._weight_amax

    def share_input_amax(self) -> None:
        amax = torch.stack([m.input_amax for m in self.members]).amax()
        for member in self.members:
            member.input_amax.fill_(amax)


class QuantLinear(nn.Module):
    """A Linear whose weight (and, for W4A4, input) is fake-quantized in the forward pass.

    Shares the wrapped Linear's parameters. Buffers: `input_amax` (calibrated, W4A4 with a calibrated
    format) and `weight_amax` (frozen weight global amax, `weight_global="frozen"`).
    """

    def __init__(self, linear: nn.Linear, config: QuantConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.format_name = config.format
        self.quantize_input = config.quantize_inputs
        self.frozen_weight_global = config.weight_global == "frozen"
        self.clip_gradient = config.clip_gradient
        self.calibrating = False
        self.group: SiblingGroup | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32))
        self.register_buffer("weight_amax", torch.zeros((), dtype=torch.float32))

    @property
    def uses_global_scale(self) -> bool:
        return self.format_name in CALIBRATED_FORMATS

    def weight_global_amax(self) -> torch.Tensor | None:
        """The amax the weight's global scale is taken from (group-wide for fused siblings)."""
        if not self.uses_global_scale:
            return None
        if self.frozen_weight_global:
            return self.weight_amax
        if self.group is not None:
            return self.group.weight_amax()
        return self.weight.detach().abs().amax().float()

    def quantized_weight(self) -> torch.Tensor:
        fmt = get_format(self.format_name)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._weight_cache = None
            return fmt.fake_quantize(self.weight, self.weight_global_amax(), self.clip_gradient)
        # Frozen weights (evaluation, diagnosis): quantize once until the weight or its amax changes.
        amax = self.weight_global_amax()
        key = (self.weight._version, self.weight.data_ptr(), None if amax is None else float(amax))
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, fmt.fake_quantize(self.weight.detach(), amax, self.clip_gradient))
        return self._weight_cache[1]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_input:
            return x
        if self.calibrating:
            # Observe, do not quantize: every layer calibrates on the teacher-like activations (ModelOpt).
            self.input_amax.copy_(torch.maximum(self.input_amax, x.detach().abs().amax().float()))
            return x
        group = self.group
        if group is not None and group.last_input is not None and group.last_input[0] is x:
            return group.last_input[1]
        amax = self.input_amax if self.uses_global_scale else None
        out = get_format(self.format_name).fake_quantize(x, amax, self.clip_gradient)
        if group is not None:
            group.last_input = (x, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        mode = "w4a4" if self.quantize_input else "w4a16"
        return f"in={self.in_features}, out={self.out_features}, format={self.format_name}, {mode}"


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


def quantize_model_(model: nn.Module, config: QuantConfig) -> QuantReport:
    """Swap the model's Linear layers for QuantLinear in place; return what was done."""
    report = QuantReport(format=config.format, scheme=config.scheme)
    swapped: dict[str, QuantLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        report.total_linear_params += module.weight.numel()
        reason = _exclusion_reason(name, module, config)
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


def build_student(teacher: nn.Module, config: QuantConfig) -> tuple[nn.Module, QuantReport]:
    """A trainable float32 copy of `teacher` with fake-quantized Linear layers (teacher untouched).

    float32 master weights: QAD learning rates (1e-5..1e-6) vanish under bf16 rounding; the forward runs
    under autocast on GPU.
    """
    student = copy.deepcopy(teacher).float()
    report = quantize_model_(student, config)
    if not report.quantized:
        raise ConfigError(f"no Linear layer of this model can be quantized with {config.format}: "
                          f"{next(iter(report.excluded.values()), 'none found')}")
    student.train(False).requires_grad_(True)
    return student, report


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
    groups = {id(m.group): m.group for m in layers.values() if m.group is not None}
    for group in groups.values():
        if group.members[0].quantize_input:
            group.share_input_amax()
    for m in layers.values():
        if m.frozen_weight_global and m.uses_global_scale:
            m.weight_amax.copy_(m.group.weight_amax() if m.group else m.weight.detach().abs().amax().float())
    return used
