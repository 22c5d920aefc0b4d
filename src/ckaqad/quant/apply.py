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
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.errors import ConfigError
from ckaqad.models.arch import (
    block_kind,
    decoder_layers,
    experts_layout,
    fused_kernel_mixers,
    high_precision_rule,
)
from ckaqad.quant.experts import QuantExperts, expert_input_dims, global_amax, quantize_experts_
from ckaqad.quant.linear import FUSED_SIBLINGS, RECIPES, QuantConfig, QuantLinear, SiblingGroup


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
    # Coverage of every parameter (quant/apply.py#coverage): name -> "quantized" or the rule that keeps it.
    coverage: dict[str, str] = field(default_factory=dict)
    non_embedding_params: int = 0
    declared_params: int = 0  # non-embedding parameters kept by a declared rule (router, norm, conv1d, lm_head...)
    calibration_tokens: dict[str, list[int]] = field(default_factory=dict)  # experts module -> routed tokens each
    quantized_experts: list[str] = field(default_factory=list)  # the fused-experts modules among `quantized`

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def share_quantized(self) -> float:
        """Quantized parameters over all non-embedding parameters."""
        return self.quantized_params / max(self.non_embedding_params, 1)

    @property
    def share_outside_declared(self) -> float:
        """Quantized parameters over the non-embedding parameters no declared rule keeps."""
        return self.quantized_params / max(self.non_embedding_params - self.declared_params, 1)

    def coverage_line(self) -> str:
        return (f"coverage: {self.share_quantized:.1%} of non-embedding parameters quantized "
                f"({self.quantized_params:,} of {self.non_embedding_params:,}; "
                f"{self.share_outside_declared:.1%} outside declared exclusions)")

    def summary(self) -> str:
        share = self.quantized_params / max(self.total_linear_params, 1)
        experts = f" and {len(self.quantized_experts)} fused-experts modules" if self.quantized_experts else ""
        lines = [f"{self.format} {self.scheme}: {len(self.quantized) - len(self.quantized_experts)} Linear layers"
                 f"{experts} quantized ({self.quantized_params:,} of {self.total_linear_params:,} Linear"
                 f"{' and expert' if experts else ''} parameters, {share:.1%}), {len(self.groups)} fused sibling "
                 "groups", self.coverage_line()]
        for name, reason in self.excluded.items():
            lines.append(f"  kept in high precision: {name} ({reason})")
        kept = Counter(r for r in self.coverage.values() if not r.startswith("quantized"))
        lines += [f"  kept in high precision by rule: {n} × {why}" for why, n in sorted(kept.items())]
        for module, tokens in self.calibration_tokens.items():
            lines.append(f"  calibration tokens per expert, {module}: {tokens}")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


def recipe_exclusions(model: nn.Module, recipe: str) -> dict[str, str]:
    """{Linear module name: reason} that the named recipe keeps in high precision."""
    RECIPES.check(recipe)
    if recipe == "none":
        return {}
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    kinds = [block_kind(b) for b in layers]
    out = {}
    for i, kind in enumerate(kinds):
        if "attention" not in kind:
            continue
        keep = [(i, "attention projection")]
        if i > 0 and kinds[i - 1] == "mamba":
            keep.append((i - 1, "Mamba projection of the block before an attention block"))
        for j, why in keep:
            for name, m in layers[j].named_modules():
                if isinstance(m, nn.Linear) and (why != "attention projection" or _in_attention(name)):
                    out[f"{prefix}.{j}.{name}"] = f"recipe {recipe}: {why}"
    return out


def _in_attention(name: str) -> bool:
    first = name.split(".", 1)[0]
    return first in ("self_attn", "attention", "attn", "mixer")


def _exclusion_reason(name: str, module: nn.Module, config: QuantConfig) -> str | None:
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern):
            return f"excluded by pattern {pattern!r}"
    in_dims = [module.in_features] if isinstance(module, nn.Linear) else list(expert_input_dims(module).values())
    for dim in in_dims:
        if dim % config.block_size:
            return f"input dim {dim} is not a multiple of the {config.format} block {config.block_size}"
    return None


def quantize_model_(model: nn.Module, config: QuantConfig, only: Iterable[str] | None = None) -> QuantReport:
    """Swap the model's Linear layers for QuantLinear in place; return what was done.

    `only`: quantize exactly these module names (a saved student's list) instead of applying the config's
    exclusion rules.
    """
    report = QuantReport(format=config.format, scheme=config.scheme)
    only = None if only is None else set(only)
    recipe = recipe_exclusions(model, config.recipe)
    swapped: dict[str, QuantLinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        report.total_linear_params += module.weight.numel()
        reason = (recipe.get(name) or _exclusion_reason(name, module, config)) if only is None else \
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
    for name, module in list(model.named_modules()):
        if experts_layout(module) is None or isinstance(module, QuantExperts):
            continue
        numel = sum(module._parameters[p].numel() for p in experts_layout(module).fused)
        report.total_linear_params += numel
        reason = (recipe.get(name) or _exclusion_reason(name, module, config)) if only is None else \
            (None if name in only else "not quantized in the saved student")
        if reason:
            report.excluded[name] = reason
            continue
        quantize_experts_(module, config)
        report.quantized.append(name)
        report.quantized_experts.append(name)
        report.quantized_params += numel
    for parent_name in sorted({n.rpartition(".")[0] for n in swapped}):
        for siblings in FUSED_SIBLINGS:
            names = [f"{parent_name}.{s}" if parent_name else s for s in siblings]
            if all(n in swapped for n in names):
                SiblingGroup([swapped[n] for n in names])
                report.groups.append(names)
    for mixer in fused_kernel_mixers(model):
        if isinstance(mixer.out_proj, QuantLinear) and not getattr(mixer, "_ckaqad_module_path", False):
            force_module_path_(mixer)
    classify_coverage(model, report, config)
    return report


def force_module_path_(mixer: nn.Module) -> None:
    """Run a Mamba mixer's forward through its modules (the path that calls the fake-quantized `out_proj`),
    never the fused kernel that reads `out_proj.weight` directly: the mixer runs its forward in eval mode
    (`models/arch.fused_kernel_mixers` says why that is the only effect), the rest of the model as it is."""
    def before(module, args, kwargs):
        module._ckaqad_was_training = module.training
        module.training = False

    def after(module, args, kwargs, output):
        module.training = module._ckaqad_was_training

    mixer.register_forward_pre_hook(before, with_kwargs=True)
    mixer.register_forward_hook(after, with_kwargs=True, always_call=True)
    mixer._ckaqad_module_path = True


def classify_coverage(model: nn.Module, report: QuantReport, config: QuantConfig) -> None:
    """Fill `report.coverage`: every parameter of the model (2-D and 3-D expert weights included), quantized
    or kept with its reason, and the parameter counts behind the shares.

    Kept by a declared rule: a `--exclude` pattern or recipe (lm_head, routers by default), or a family rule of
    `models/arch.high_precision_rule` (routers, norms, conv1d, Mamba A/D/dt, biases). A weight of a decoder block
    that is neither quantized nor covered by a rule is a ConfigError (`--allow-unquantized`: a warning listing
    them): ckaqad would otherwise train and export a model that is not what the user asked for, silently.
    """
    quantized = {id(p) for p in quantized_parameters(model)}
    # Input and output embeddings (the head) are not counted: the share is of non-embedding parameters.
    embeddings = {id(getattr(getattr(model, getter, lambda: None)(), "weight", None))
                  for getter in ("get_input_embeddings", "get_output_embeddings")} - {id(None)}
    try:
        block_prefixes = [name for name, m in model.named_modules() if m is decoder_layers(model)]
        blocks = block_prefixes[0] + "." if block_prefixes else None
    except Exception:  # a model without recognised blocks: every tensor is checked alike
        blocks = None
    seen: set[int] = set()
    unruled: list[str] = []
    report.coverage, report.non_embedding_params, report.declared_params = {}, 0, 0
    for module_name, module in model.named_modules():
        for param_name, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(tensor) in embeddings:
                report.coverage[name] = "embedding (not counted)"
                continue
            report.non_embedding_params += tensor.numel()
            if id(tensor) in quantized:
                report.coverage[name] = "quantized (experts)" if isinstance(module, QuantExperts) else "quantized"
                continue
            excluded = report.excluded.get(module_name)
            rule = high_precision_rule(module, param_name, tensor)
            if excluded is not None and excluded.startswith(("excluded by pattern", "recipe ", "not quantized in")):
                report.coverage[name] = excluded
                report.declared_params += tensor.numel()
            elif rule is not None:
                report.coverage[name] = rule
                report.declared_params += tensor.numel()
            elif excluded is not None:
                report.coverage[name] = excluded  # e.g. a width the format's block does not divide: listed
            else:
                report.coverage[name] = "no rule"
                if blocks is None or name.startswith(blocks):
                    unruled.append(f"{name} {tuple(tensor.shape)}")
    if unruled:
        message = (f"{len(unruled)} weight(s) of the decoder blocks would stay in high precision with no rule: "
                   f"{', '.join(unruled[:8])}{' ...' if len(unruled) > 8 else ''}")
        if not config.allow_unquantized:
            raise ConfigError(message + " (quantize them, --exclude them, or pass --allow-unquantized)")
        warnings.warn(message, stacklevel=2)


def coverage_of(model: nn.Module) -> QuantReport:
    """The coverage of an already-quantized model (a loaded student): its quantized modules as they are, every
    other Linear layer or experts module kept as the saved student chose."""
    config = quant_config_of(model) or QuantConfig()
    report = QuantReport(format=config.format, scheme=config.scheme)
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            report.quantized.append(name)
            report.quantized_params += sum(p.numel() for p in _quantized_of(module))
            if isinstance(module, QuantExperts):
                report.quantized_experts.append(name)
        elif isinstance(module, nn.Linear) or experts_layout(module) is not None:
            report.excluded[name] = "not quantized in the saved student"
    report.total_linear_params = report.quantized_params + sum(
        p.numel() for n in report.excluded for p in model.get_submodule(n).parameters(recurse=False))
    classify_coverage(model, report, config)
    return report


def _quantized_of(module: QuantLinear | QuantExperts) -> list[nn.Parameter]:
    if isinstance(module, QuantLinear):
        return [module.weight]
    return [module.master(p) for p in module.layout.fused]


def block_kind_params(model: nn.Module, report: QuantReport) -> dict[str, dict[str, int]]:
    """Per block kind (mamba, attention, moe, mlp...): quantized and total parameters of its blocks."""
    out: dict[str, dict[str, int]] = {}
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    for i, block in enumerate(layers):
        kind = out.setdefault(block_kind(block), {"quantized": 0, "total": 0})
        for name, tensor in block.named_parameters():
            full = f"{prefix}.{i}.{name}"
            kind["total"] += tensor.numel()
            kind["quantized"] += tensor.numel() if report.coverage.get(full, "").startswith("quantized") else 0
    return out


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quant_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """The model's fake-quantized fused-experts modules, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}


def quant_modules(model: nn.Module) -> dict[str, QuantLinear | QuantExperts]:
    """Every fake-quantized module (Linear layers and fused experts), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}


def quantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the student fake-quantizes (its quantized weights, masters of the served codes)."""
    params = [m.weight for m in quant_linears(model).values()]
    params += [m.master(p) for m in quant_experts(model).values() for p in m.layout.fused]
    return params


@torch.no_grad()
def calibrate(student: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Max-calibrate input global amaxes (W4A4) and freeze them; freeze weight amaxes if configured.

    `batches` yields model kwargs (input_ids, attention_mask) already on the student's device. Padding
    tokens pass through the Linear layers too; they come from real embeddings, so they do not inflate amax
    beyond what the model produces. Returns the number of batches used.
    """
    layers = quant_linears(student)
    experts = list(quant_experts(student).values())
    # Frozen weight amaxes first: the calibration forward quantizes the weights with them (zero amaxes would
    # quantize every weight to 0 and starve the later layers' activation amaxes).
    for m in layers.values():
        if m.frozen_weight_global and m.uses_global_scale:
            m.weight_amax.copy_(m.current_weight_amax())
    for m in experts:
        for param in m.layout.fused:
            m._buffers[f"{param}_weight_amax"].copy_(m.current_weight_amax(param))
        m.calib_tokens.zero_()
    needs_inputs = [m for m in layers.values() if m.quantize_input and m.uses_global_scale]
    needs_inputs += [m for m in experts if m.quantize_input and m.uses_global_scale]
    used = 0
    if needs_inputs:
        for m in needs_inputs:
            for amax in _input_amaxes(m):
                amax.zero_()
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
        for amax in _input_amaxes(m):
            amax.copy_(_finite_input_amax(m, amax))
    groups = {id(m.group): m.group for m in layers.values() if m.group is not None}
    for group in groups.values():
        if group.members[0].quantize_input:
            group.share_input_amax()
    return used


def _input_amaxes(module: QuantLinear | QuantExperts) -> list[torch.Tensor]:
    if isinstance(module, QuantLinear):
        return [module.input_amax]
    return [module._buffers[f"{p}_input_amax"] for p in module.layout.fused]


def _finite_input_amax(module: QuantLinear | QuantExperts, amax: torch.Tensor) -> torch.Tensor:
    """The calibrated input amax as its global scale takes it (pow2-rounded where configured)."""
    if isinstance(module, QuantLinear):
        return module.global_amax(amax)
    return global_amax(amax, module.quant_config.global_scale == "pow2")


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig the model's quantized modules were built with (None for an unquantized model)."""
    layers = quant_linears(model)
    if layers:
        return next(iter(layers.values())).config
    experts = quant_experts(model)
    return next(iter(experts.values())).quant_config if experts else None


@torch.no_grad()
def freeze_scales(model: nn.Module) -> None:
    """Write every global amax the forward uses into buffers: `weight_amax` (group-wide for siblings, the
    dynamic amax of the current weight otherwise), so `export.compress` can work from a state dict alone."""
    for m in quant_linears(model).values():
        amax = m.weight_global_amax()
        if amax is not None:
            m.weight_amax.copy_(amax)
    for m in quant_experts(model).values():
        for param in m.layout.fused:
            amax = m.weight_global_amax(param)
            if amax is not None:
                m._buffers[f"{param}_weight_amax"].copy_(amax)


@contextlib.contextmanager
def cached_quantized_weights(*models: nn.Module) -> Iterator[None]:
    """Quantize each QuantLinear's weight once for the duration of the block (evaluation, generation), and
    drop the copies afterwards. The weights must not change inside the block."""
    layers = [m for model in models for m in quant_modules(model).values()]
    # nested use keeps the outer copies
    held = [m for m in layers if (m._held_weight if isinstance(m, QuantLinear) else m._held) is None]
    for m in held:
        m.hold_quantized_weight()
    try:
        yield
    finally:
        for m in held:
            m.release_quantized_weight()
