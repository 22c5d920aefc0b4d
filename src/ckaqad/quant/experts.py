"""Fake-quantized fused experts: the second kind of quantized module beside `QuantLinear`.

transformers 5 keeps a MoE layer's routed experts as fused 3-D parameters of one `*Experts` module
(`models/arch.py#ExpertsLayout`) and runs them through `experts_implementation` grouped_mm, batched_mm or
eager; each implementation reads `self.gate_up_proj` (or `up_proj`) and `self.down_proj` once per forward.
`quantize_experts_` gives the module a subclass (`QuantExperts` + its own class) whose projections are
properties returning the per-expert fake-quantized tensor of the float32 master, with a straight-through
gradient; the parameters stay where they were (same names in the state dict, the same objects FSDP2 shards).
Why this and not a parametrization or per-expert Linear layers: docs/method.md#fused-experts (measured by
benchmarks/bench_moe_quant.py).

Scales, as the serving engines read them (docs/method.md#mixture-of-experts-in-nvfp4):
- weights: one global scale per expert and fused parameter, so gate and up of one expert share theirs
  (vLLM fuses them into w13); recomputed from the current weights, or frozen at calibration
  (`weight_global="frozen"`), in `<param>_weight_amax` [E];
- W4A4 inputs: one global amax per fused parameter shared by the layer's experts, in `<param>_input_amax`
  (vLLM's FlashInfer MoE backends take the max over experts anyway): the hidden states into gate/up and the
  gated activation into down are both fake-quantized;
- calibration sends every token through every expert for the activation amaxes and keeps only the routed
  outputs (llm-compressor's `moe_calibrate_all_experts`); `calib_tokens` [E] counts the routed tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from ckaqad.formats import CALIBRATED_FORMATS, backends, get_format
from ckaqad.formats.nvfp4_runtime import pow2_global_amax
from ckaqad.formats.ste import straight_through
from ckaqad.models.arch import ExpertsLayout, experts_layout
from ckaqad.quant.linear import SERVED_FUNCTIONS, QuantConfig, StepQuantizedWeights, abs_max


def global_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """The amax a global scale is taken from (elementwise): itself, or rounded up to 2688·2^-k; 0 stays 0."""
    if not pow2:
        return amax
    return torch.where(amax > 0, pow2_global_amax(amax.clamp_min(torch.finfo(torch.float32).tiny)), amax)


def fake_quantize_activation(x: torch.Tensor, amax: torch.Tensor | None, config: QuantConfig) -> torch.Tensor:
    """W4A4 input fake quant with one calibrated global amax (None for formats without one), through the same
    entry points QuantLinear uses: the format's `fake_quantize`, or a served arithmetic with a straight-through
    gradient."""
    if config.arithmetic in SERVED_FUNCTIONS:
        return straight_through(SERVED_FUNCTIONS[config.arithmetic][0], x, amax, config.clip_gradient)
    return get_format(config.format).fake_quantize(x, amax, config.clip_gradient)


# Experts of at least this many weights each are fake-quantized one call per expert even on the reference path:
# measured on CPU (benchmarks/bench_moe_quant.py, docs/method.md#fused-experts) one 3-D call is 3-4x faster for
# many small experts (128 x 96x256, 32 x 256x256) and 1.8x slower for 8 experts of 3584x512, whose per-call
# intermediates no longer fit in cache.
ONE_CALL_PER_EXPERT_FROM = 1 << 20


def fake_quantize_expert_weights(weight: torch.Tensor, amax: torch.Tensor | None,
                                 config: QuantConfig) -> torch.Tensor:
    """Per-expert fake quant of canonical expert weights `[E, out, in]` (blocks along `in`), expert `e` with
    global amax `amax[e]` ([E] float32, or None for formats without global scales); same shape and dtype,
    straight-through gradient to `weight`.

    Dispatch (docs/method.md#fused-experts, measured by benchmarks/bench_moe_quant.py): where a fast backend
    serves the tensor (`formats/backends.py`: it takes one scalar global amax) or a served arithmetic is asked
    for, each expert goes through the same 2-D entry point QuantLinear calls; otherwise the format's fp32
    reference runs once on the 3-D tensor with the amax broadcast per expert ([E, 1, 1]), which is the same
    arithmetic element for element without E small calls.
    """
    if config.arithmetic in SERVED_FUNCTIONS:
        served = SERVED_FUNCTIONS[config.arithmetic][1]
        return torch.stack([straight_through(served, weight[e], amax[e], config.clip_gradient)
                            for e in range(weight.shape[0])])
    fmt = get_format(config.format)
    if amax is None:  # no per-tensor state: the blocks of all experts at once
        return fmt.fake_quantize(weight, None, config.clip_gradient)
    if backends.fast_path(config.format, weight) is None and weight[0].numel() < ONE_CALL_PER_EXPERT_FROM:
        return straight_through(fmt.fake_quantize_reference, weight, amax.view(-1, 1, 1), config.clip_gradient)
    return torch.stack([fmt.fake_quantize(weight[e], amax[e], config.clip_gradient) for e in range(weight.shape[0])])


class QuantExperts(StepQuantizedWeights, nn.Module):
    """Mixin of a fused-experts module whose expert weights (and, for W4A4, expert GEMM inputs) are
    fake-quantized; built only by `quantize_experts_`, which subclasses the module's own class with it.

    Public surface (also what the export reads; docs in /work/notes/moe-api.md and docs/moe.md):
    - `layout` (`ExpertsLayout`), `quant_config`;
    - `master(param)`: the stored float32 parameter; reading `self.<param>` gives its fake-quantized value;
    - `canonical_weights()`: `{proj: [E, out, in]}` masters per canonical projection, gate/up de-interleaved;
    - `weight_global_amaxes()`: `{proj: [E]}` (gate and up equal), `input_amaxes()`: `{proj: scalar}`;
    - `canonical_biases()`: `{proj: [E, out]}` (gpt_oss);
    - buffers `<param>_weight_amax` [E], `<param>_input_amax` [] and `calib_tokens` [E] (int64).
    """

    layout: ExpertsLayout
    quant_config: QuantConfig

    def _init_quant(self, layout: ExpertsLayout, config: QuantConfig) -> None:
        self.layout = layout
        self.quant_config = config
        self.calibrating = False
        self._held: dict[str, torch.Tensor] | None = None
        num_experts = self._parameters[layout.input_param].shape[0]
        for param in layout.fused:
            self.register_buffer(f"{param}_weight_amax", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer(f"{param}_input_amax", torch.zeros((), dtype=torch.float32))
        self.register_buffer("calib_tokens", torch.zeros(num_experts, dtype=torch.int64))

    # -- weights ---------------------------------------------------------------------------------------------
    @property
    def quantize_input(self) -> bool:
        return self.quant_config.quantize_inputs

    @property
    def uses_global_scale(self) -> bool:
        return self.quant_config.format in CALIBRATED_FORMATS

    @property
    def frozen_weight_global(self) -> bool:
        return self.quant_config.weight_global == "frozen"

    def master(self, param: str) -> nn.Parameter:
        """The stored (float32 master) fused parameter, not its fake-quantized value."""
        return self._parameters[param]

    def current_weight_amax(self, param: str) -> torch.Tensor:
        """Per-expert global amax [E] of the current weights (pow2-rounded where configured)."""
        amax = abs_max(self.master(param), dim=(-2, -1))
        return global_amax(amax, self.quant_config.global_scale == "pow2")

    def weight_global_amax(self, param: str) -> torch.Tensor | None:
        """The per-expert amax [E] the forward takes the weight global scales from (None: no global scale)."""
        if not self.uses_global_scale:
            return None
        if self.frozen_weight_global:
            return self._buffers[f"{param}_weight_amax"]
        return self.current_weight_amax(param)

    def _fake_quantized(self, param: str, weight: torch.Tensor) -> torch.Tensor:
        canon = self.layout.canonical(param, weight)
        out = fake_quantize_expert_weights(canon, self.weight_global_amax(param), self.quant_config)
        return self.layout.canonical(param, out)  # back to the stored orientation (transpose is its own inverse)

    def quantized_weight(self, param: str) -> torch.Tensor:
        """The fake-quantized value of fused parameter `param`, in its stored layout."""
        if self._held is not None:
            return self._held[param]
        if self._step_held is not None:  # once per optimizer step (linear.StepQuantizedWeights)
            return self.step_quantized(param, self.master(param), lambda w: self._fake_quantized(param, w),
                                       self.quant_config.clip_gradient)
        return self._fake_quantized(param, self.master(param))

    def _read_projection(self, param: str) -> torch.Tensor:
        """`self.<param>`: the fake-quantized weight; but a sharded DTensor parameter is FSDP2 reading back what
        it registered (`reset_sharded_param`), and gets the parameter itself. In a forward FSDP2 has put the
        unsharded (plain) parameter in place, so the experts implementations always see the quantized one."""
        stored = self._parameters[param]
        if isinstance(stored, DTensor):
            return stored
        weight = self.quantized_weight(param)
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            # grouped_mm is not autocast-enabled and casts its input to the weight's dtype: hand it the autocast
            # dtype, as QuantLinear casts its quantized weight to the input's dtype.
            weight = weight.to(torch.get_autocast_dtype(device))
        return weight

    @torch.no_grad()
    def hold_quantized_weight(self) -> None:
        self._held = {p: self._fake_quantized(p, self.master(p).detach()) for p in self.layout.fused}

    def release_quantized_weight(self) -> None:
        self._held = None

    # -- activations -----------------------------------------------------------------------------------------
    def quantized_input(self, param: str, x: torch.Tensor) -> torch.Tensor:
        """W4A4 fake quant of the input of fused parameter `param` (observe its amax while calibrating)."""
        if not self.quantize_input:
            return x
        amax = self._buffers[f"{param}_input_amax"]
        if self.calibrating:
            amax.copy_(torch.maximum(amax, x.detach().abs().amax().float()))
            return x
        return fake_quantize_activation(x, amax if self.uses_global_scale else None, self.quant_config)

    def _activation(self, projected: torch.Tensor) -> torch.Tensor:
        """The family's own gate (or activation, for non-gated experts) of the first projection's output."""
        if self.has_gate:
            return super()._apply_gate(projected)
        return self._modules["act_fn"](projected)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        # Called by grouped_mm / batched_mm / eager between the two GEMMs: the gated activation is down's input.
        return self.quantized_input(self.layout.output_param, super()._apply_gate(gate_up))

    def _activate_non_gated(self, up: torch.Tensor) -> torch.Tensor:
        return self.quantized_input(self.layout.output_param, self._modules["act_fn"](up))

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = self.quantized_input(self.layout.input_param, hidden_states)
        if self.calibrating:
            self._observe_all_experts(x, top_k_index)
        implementation = getattr(self.config, "_experts_implementation", None)
        forward = _experts_function(implementation)
        return forward(self, x, top_k_index, top_k_weights)

    @torch.no_grad()
    def _observe_all_experts(self, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        """Calibration: count each expert's routed tokens, and observe down's input amax on every token
        through every expert (llm-compressor's moe_calibrate_all_experts), so no expert goes uncalibrated."""
        num_experts = self.calib_tokens.shape[0]
        routed = top_k_index.reshape(-1)
        self.calib_tokens += torch.bincount(routed[routed < num_experts], minlength=num_experts).to(
            self.calib_tokens.device)
        if not self.quantize_input:
            return
        first = self.layout.input_param
        weight = self.layout.canonical(first, self.quantized_weight(first))  # [E, out, in]
        bias_name = self.layout.biases.get(first)
        amax = self._buffers[f"{self.layout.output_param}_input_amax"]
        for e in range(num_experts):
            bias = self._parameters[bias_name][e] if bias_name else None
            act = self._activation(F.linear(x, weight[e].to(x.dtype), bias))
            amax.copy_(torch.maximum(amax, act.abs().amax().float()))

    def extra_repr(self) -> str:
        mode = "w4a4" if self.quantize_input else "w4a16"
        return (f"experts={self.calib_tokens.shape[0]}, projections={'/'.join(self.layout.projections)}, "
                f"format={self.quant_config.format}, {mode}")

    # -- what the export reads -------------------------------------------------------------------------------
    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """`{proj: [E, out, in]}` float32 masters (detached views) per canonical projection."""
        return {proj: w for param in self.layout.fused
                for proj, w in self.layout.split(param, self.master(param).detach()).items()}

    def canonical_biases(self) -> dict[str, torch.Tensor]:
        """`{proj: [E, out]}` biases per canonical projection (empty when the experts have none)."""
        return {proj: b for param, bias in self.layout.biases.items()
                for proj, b in self.layout.split(param, self._parameters[bias].detach()).items()}

    @torch.no_grad()
    def weight_global_amaxes(self) -> dict[str, torch.Tensor]:
        """`{proj: [E]}` the weight global amax each expert's projection is quantized with (gate = up)."""
        out = {}
        for param, projs in self.layout.fused.items():
            amax = self.weight_global_amax(param)
            out.update({proj: amax for proj in projs} if amax is not None else {})
        return out

    def input_amaxes(self) -> dict[str, torch.Tensor]:
        """`{proj: []}` the calibrated input amax of each projection, shared by the experts (W4A4 only)."""
        if not self.quantize_input:
            return {}
        return {proj: self._buffers[f"{param}_input_amax"] for param, projs in self.layout.fused.items()
                for proj in projs}

    def _apply(self, fn, recurse=True):
        if self.quant_config.arithmetic not in SERVED_FUNCTIONS:
            return super()._apply(fn, recurse)
        # Runtime arithmetic: the global scales are float32 facts of the checkpoint (as in QuantLinear).
        amaxes = {n: b for n, b in self._buffers.items() if n.endswith("_amax")}
        out = super()._apply(fn, recurse)
        for name, old in amaxes.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return out


def _eager_experts_forward(self: QuantExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop for every family (its per-family copies inline the gate, which would
    skip down's input quantizer): per hit expert, linear -> gate -> linear -> routing weight -> index_add."""
    layout = self.layout
    first, second = layout.input_param, layout.output_param
    up_w = layout.canonical(first, getattr(self, first))
    down_w = layout.canonical(second, getattr(self, second))
    up_b = self._parameters[layout.biases[first]] if first in layout.biases else None
    down_b = self._parameters[layout.biases[second]] if second in layout.biases else None
    num_experts = up_w.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        h = F.linear(hidden_states[token_idx], up_w[e], None if up_b is None else up_b[e])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = F.linear(h, down_w[e], None if down_b is None else down_b[e])
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def _experts_function(implementation: str | None) -> Callable:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation in (None, "eager") or implementation not in ALL_EXPERTS_FUNCTIONS:
        return _eager_experts_forward
    return ALL_EXPERTS_FUNCTIONS[implementation]


_QUANT_CLASSES: dict[type, type] = {}


def _quant_class(cls: type, layout: ExpertsLayout) -> type:
    """`QuantExperts` + `cls`, with each fused parameter a property giving its fake-quantized value."""
    key = (cls, tuple(layout.fused))
    if key not in _QUANT_CLASSES:
        namespace: dict = {p: property(lambda self, p=p: self._read_projection(p)) for p in layout.fused}
        if "gate_proj" not in layout.projections:
            # Non-gated experts (nemotron_h's relu²) call `self.act_fn` between the GEMMs: down's input.
            namespace["act_fn"] = property(lambda self: self._activate_non_gated)
        _QUANT_CLASSES[key] = type(f"Quant{cls.__name__}", (QuantExperts, cls), namespace)
    return _QUANT_CLASSES[key]


def quantize_experts_(module: nn.Module, config: QuantConfig) -> QuantExperts:
    """Make a transformers fused-experts module fake-quantize its experts, in place (same parameters, same
    state-dict names plus the scale buffers); returns it."""
    layout = experts_layout(module)
    if layout is None:
        raise TypeError(f"{type(module).__name__} is not a fused-experts module")
    module.__class__ = _quant_class(type(module), layout)
    module._init_quant(layout, config)
    return module


def expert_input_dims(module: nn.Module) -> dict[str, int]:
    """The GEMM input dim (the block axis) of each fused parameter of an experts module."""
    layout = experts_layout(module) if not isinstance(module, QuantExperts) else module.layout
    return {p: layout.canonical(p, module._parameters[p]).shape[-1] for p in layout.fused}
