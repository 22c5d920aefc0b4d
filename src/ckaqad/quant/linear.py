"""The fake-quantized Linear layer and its config: `QuantConfig`, `QuantLinear`, fused `SiblingGroup`s.

Scales (docs/method.md#nvfp4-and-the-comparison-formats): weight block scales are recomputed from the current
weight every forward; the weight global scale is recomputed too (`weight_global="dynamic"`, torchao's choice)
or frozen after calibration (`"frozen"`, ModelOpt's). Activation global scales come from max-calibration on a
few batches and are then frozen. Fused siblings (q/k/v, gate/up) share one weight and one input global scale,
because vLLM fuses them into one GEMM with one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from ckaqad.errors import ConfigError
from ckaqad.formats import CALIBRATED_FORMATS, FORMATS, backends, get_format, nvfp4
from ckaqad.formats.nvfp4_runtime import (
    pow2_global_amax,
    runtime_dequantize_weight,
    runtime_fake_quantize,
    vllm_emulation_dequantize_weight,
    vllm_emulation_fake_quantize,
)
from ckaqad.formats.ste import straight_through
from ckaqad.registry import Registry, unknown_name

# scheme -> quantize activations (inputs of Linear layers)?  Weights are always quantized.
SCHEMES: dict[str, bool] = {"w4a16": False, "w4a4": True}
WEIGHT_GLOBAL_MODES = ("dynamic", "frozen")
# How the forward computes the fake-quantized values: "reference" is ckaqad's fp32 arithmetic
# (formats/nvfp4.py); "runtime" is compressed-tensors' served forward, op for op (formats/nvfp4_runtime.py);
# "vllm-emulation" is vLLM's NVFP4 emulation of the same checkpoint (reciprocal global scales).
# The served ones (SERVED_FUNCTIONS below) run in the model's dtype with the checkpoint's float32 global scales.
ARITHMETICS = ("reference", "runtime", "vllm-emulation")
RUNTIME_FORMATS = ("nvfp4",)
# Global scales: "exact" is amax/(6·448) (every peer's choice); "pow2" rounds the amax up to 2688·2^-k, so the
# global scale is a power of two and every dequantized value is exact in bf16 in any runtime
# (formats/nvfp4_runtime.py; docs/serving.md#power-of-two-global-scales).
GLOBAL_SCALES = ("exact", "pow2")
# The tensors a quantized student holds in high precision (norms, embeddings, unquantized Linear layers such as
# the head): "frozen" rounds them to bf16, as the export stores them, and does not train them; "train" keeps
# float32 masters that train and are rounded only by the export (the run then measures a model nobody serves).
HIGH_PRECISION = ("frozen", "train")
# Modules left in high precision by default: the output head and MoE routers (embeddings and norms are
# not Linear layers, so they are never swapped).
DEFAULT_EXCLUDE = ("lm_head", "*.router", "*.gate")
# Named choices of what stays in high precision on top of --exclude (quant/apply.py#recipe_exclusions).
RECIPES: Registry[str] = Registry("recipe", flag="--recipe")
RECIPES.register("none", "only --exclude and the default rules")
RECIPES.register("nemotron-nano-nvfp4", "NVIDIA's published Nemotron-3-Nano NVFP4: attention projections and the "
                                        "Mamba in/out projections of the block just before each attention block "
                                        "stay BF16")
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
    calib_batch_size: int = 4
    """training blocks per calibration batch (calibration sees the first calib_batches x this many)"""
    weight_global: str = "dynamic"
    """weight global scale: dynamic (recomputed each forward) or frozen (fixed at calibration)"""
    clip_gradient: bool = False
    """zero the straight-through gradient where |x| exceeds the global amax"""
    arithmetic: str = "reference"
    """reference (ckaqad's), runtime (compressed-tensors' served forward, element for element) or vllm-emulation"""
    global_scale: str = "exact"
    """NVFP4 global scales: exact (amax/2688) or pow2 (amax rounded up to 2688*2^-k: exact in bf16 in any runtime)"""
    high_precision: str = "frozen"
    """norms, embeddings and unquantized layers: frozen (rounded to bf16 as the export stores them) or train (fp32)"""
    recipe: str = "none"
    """named choice of what stays in high precision on top of --exclude: none or nemotron-nano-nvfp4"""
    allow_unquantized: bool = False
    """warn (listing them) instead of failing when a block weight would stay in high precision with no rule"""

    def __post_init__(self) -> None:
        FORMATS.check(self.format)
        if self.scheme not in SCHEMES:
            raise unknown_name("scheme (--scheme)", self.scheme, SCHEMES)
        if self.weight_global not in WEIGHT_GLOBAL_MODES:
            raise unknown_name("weight global mode (--weight-global)", self.weight_global, WEIGHT_GLOBAL_MODES)
        if self.arithmetic not in ARITHMETICS:
            raise unknown_name("arithmetic (--arithmetic)", self.arithmetic, ARITHMETICS)
        if self.arithmetic in SERVED_FUNCTIONS and self.format not in RUNTIME_FORMATS:
            raise ConfigError(f"--arithmetic {self.arithmetic} is only available for {', '.join(RUNTIME_FORMATS)} "
                              f"(a serving runtime's arithmetic), not {self.format}")
        if self.global_scale not in GLOBAL_SCALES:
            raise unknown_name("global scale (--global-scale)", self.global_scale, GLOBAL_SCALES)
        if self.global_scale == "pow2" and self.format not in CALIBRATED_FORMATS:
            raise ConfigError(f"--global-scale pow2 needs a format with global scales, not {self.format}")
        if self.high_precision not in HIGH_PRECISION:
            raise unknown_name("high-precision policy (--high-precision)", self.high_precision, HIGH_PRECISION)
        if self.calib_batches < 1 or self.calib_batch_size < 1:
            raise ConfigError("--calib-batches and --calib-batch-size must be at least 1")
        RECIPES.check(self.recipe)
        # `--exclude a,b` and `--exclude a b` (and a YAML list) name the same patterns.
        self.exclude = tuple(p.strip() for entry in self.exclude for p in str(entry).split(",") if p.strip())

    @property
    def runtime_arithmetic(self) -> bool:
        return self.arithmetic in SERVED_FUNCTIONS

    @property
    def quantize_inputs(self) -> bool:
        return SCHEMES[self.scheme]

    @property
    def block_size(self) -> int:
        return get_format(self.format).BLOCK_SIZE


def abs_max(weight: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """max |weight| (over `dim`, default all) in float32 as a plain tensor: of a sharded weight outside a
    forward (calibrating a meta-built student, parallel/loading.py) the max over every rank's shard."""
    amax = weight.detach().abs().amax(dim=dim if dim is not None else ()).float()
    return amax.full_tensor() if isinstance(amax, DTensor) else amax


class SiblingGroup:
    """Fused siblings sharing global scales. Not a Module, so its members are not registered twice."""

    def __init__(self, members: list[QuantLinear]) -> None:
        self.members = members
        # q/k/v (gate/up) receive the same input tensor: quantize it once per forward.
        self.last_input: tuple[torch.Tensor, torch.Tensor] | None = None
        for member in members:
            member.group = self

    def weight_amax(self) -> torch.Tensor:
        """The members' joint weight amax, as the global scale takes it (pow2-rounded where configured).
        """
        # Recomputed on every call, not cached on tensor versions: FSDP2's all-gather refills the same storage
        # and preserves version counters, so such a cache goes stale silently. It reads the group's weights
        # once, which is small next to fake-quantizing them.
        amax = torch.stack([abs_max(m.weight) for m in self.members]).amax()
        return self.members[0].global_amax(amax)

    def share_input_amax(self) -> None:
        amax = torch.stack([m.input_amax for m in self.members]).amax()
        for member in self.members:
            member.input_amax.fill_(amax)


def _runtime_input(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' W4A4 input quantize-dequantize, in x's dtype, with the global scale the export
    stores for this amax."""
    return runtime_fake_quantize(x, nvfp4.reciprocal_global_scale(amax))


def _runtime_weight(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The weight compressed-tensors serves for this master weight: ckaqad's codes and block scales (the ones
    the export writes), decompressed as `NVFP4PackedCompressor` does to bf16, and held in w's dtype (exact) so
    that the straight-through gradient reaches a float32 master weight unrounded."""
    fused = backends.fast_path("runtime-weight", w)
    if fused is not None:
        return fused(w, amax)
    q = nvfp4.quantize(w.float(), amax)
    return runtime_dequantize_weight(q.codes, q.block_scales, nvfp4.reciprocal_global_scale(amax),
                                     dtype=torch.bfloat16).to(w.dtype)


def _vllm_input(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """vLLM's emulated W4A4 input quantize-dequantize of the same checkpoint."""
    return vllm_emulation_fake_quantize(x, nvfp4.reciprocal_global_scale(amax))


def _vllm_weight(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """The weight vLLM's emulation serves for this master weight (the export's codes and scales)."""
    q = nvfp4.quantize(w.float(), amax)
    return vllm_emulation_dequantize_weight(q.codes, q.block_scales, nvfp4.reciprocal_global_scale(amax),
                                            dtype=torch.bfloat16).to(w.dtype)


# arithmetic -> (input fake-quant, weight fake-quant) of a served arithmetic, each (tensor, amax) -> tensor.
SERVED_FUNCTIONS = {"runtime": (_runtime_input, _runtime_weight), "vllm-emulation": (_vllm_input, _vllm_weight)}


class _HeldStraightThrough(torch.autograd.Function):
    """Returns a fake-quantized weight computed earlier in the step; the backward passes the gradient to the
    master weight, masked where the held clip mask says so: the same gradient as `ste.straight_through`."""

    @staticmethod
    def forward(ctx, weight, held, inside):
        ctx.has_mask = inside is not None
        if ctx.has_mask:
            ctx.save_for_backward(inside)
        return held.view_as(held)

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_mask:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None


class StepQuantizedWeights:
    """Mixin: quantize each weight once per optimizer step, not once per micro-batch forward.

    Between `begin_step_cache()` and `end_step_cache()` (`apply.weights_quantized_once_per_step`, which the
    trainer opens around a step's micro-batches and closes before the optimizer step), `step_quantized(key,
    weight, ...)` fake-quantizes `weight` on its first call, without autograd, and returns the held values on
    every call, linked to `weight` by a straight-through node: the gradients equal the uncached path's
    (tests/quant/test_step_cache.py). Outside the block it fake-quantizes every call, as before. A module kind
    with other weights (fused experts) inherits this, calls `step_quantized(key, weight, fake_quantize, clip)`
    per weight tensor, and is picked up by the same context.
    """

    _step_held: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def begin_step_cache(self) -> None:
        self._step_held = {}

    def end_step_cache(self) -> None:
        self._step_held = None

    def step_quantized(self, key: str, weight: torch.Tensor, fake_quantize, clip: bool = False) -> torch.Tensor:
        """`fake_quantize(weight)` (a straight-through fake quant), computed once per step while the cache is
        open. With `clip` (a clipped straight-through), its gradient mask is taken from `fake_quantize` itself
        once, by one backward of ones, so any module kind's mask (per-expert amaxes too) is held exactly."""
        if self._step_held is None or not torch.is_grad_enabled():
            return fake_quantize(weight)
        if key not in self._step_held:
            w = weight.detach().requires_grad_(clip)
            held = fake_quantize(w)
            inside = torch.autograd.grad(held, w, torch.ones_like(held))[0] if clip else None
            self._step_held[key] = (held.detach(), inside)
        held, inside = self._step_held[key]
        return _HeldStraightThrough.apply(weight, held, inside)


class QuantLinear(StepQuantizedWeights, nn.Module):
    """A Linear whose weight (and, for W4A4, input) is fake-quantized in the forward pass.

    Shares the wrapped Linear's parameters. Buffers: `input_amax` (calibrated, W4A4 with a calibrated
    format) and `weight_amax` (the weight global amax: used by the forward with `weight_global="frozen"`,
    written by `freeze_scales` before an export otherwise).

    With grad enabled the weight is fake-quantized every forward. `hold_quantized_weight()` computes it once
    and keeps it until `release_quantized_weight()` (`apply.cached_quantized_weights` does both around an
    evaluation): an explicit cache, since no automatic key on the weight is safe under FSDP2.

    With `arithmetic="runtime"` (NVFP4) the forward computes what compressed-tensors' served forward computes:
    the input is fake-quantized by `runtime_fake_quantize` in its own dtype with G = fl32(2688 / input_amax),
    and the weight is the bf16 decompression of its codes (`runtime_dequantize_weight`), cast to the input's
    dtype; both with straight-through gradients. The amax buffers then stay float32 under `.to(dtype)`, as
    the export stores the global scales: `student.to(torch.bfloat16)` runs the served bf16 model.
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
        self.arithmetic = config.arithmetic
        self.pow2_global_scale = config.global_scale == "pow2"
        self.config = config
        self.calibrating = False
        self.group: SiblingGroup | None = None
        self._held_weight: torch.Tensor | None = None
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32))
        self.register_buffer("weight_amax", torch.zeros((), dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        if self.arithmetic not in SERVED_FUNCTIONS:
            return super()._apply(fn, recurse)
        # Runtime arithmetic: the global scales are float32 facts of the checkpoint; a dtype cast of the
        # model must not round them (it would change G), a device move still moves them.
        amaxes = {name: self._buffers[name] for name in ("input_amax", "weight_amax")}
        out = super()._apply(fn, recurse)
        for name, old in amaxes.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return out

    @property
    def uses_global_scale(self) -> bool:
        return self.format_name in CALIBRATED_FORMATS

    def global_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The amax a global scale is taken from for this observed amax: itself, or rounded up to 2688·2^-k
        with `global_scale="pow2"` (an all-zero tensor keeps amax 0)."""
        if not self.pow2_global_scale:
            return amax
        return torch.where(amax > 0, pow2_global_amax(amax.clamp_min(torch.finfo(torch.float32).tiny)), amax)

    def current_weight_amax(self) -> torch.Tensor:
        """The weight global amax of the current weights (group-wide for fused siblings)."""
        if self.group is not None:
            return self.group.weight_amax()
        return self.global_amax(abs_max(self.weight))

    def weight_global_amax(self) -> torch.Tensor | None:
        """The amax the weight's global scale is taken from: frozen at calibration, or of the current weights."""
        if not self.uses_global_scale:
            return None
        if self.frozen_weight_global:
            return self.weight_amax
        return self.current_weight_amax()

    def _fake_quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.arithmetic in SERVED_FUNCTIONS:
            fake_quantize = SERVED_FUNCTIONS[self.arithmetic][1]
            return straight_through(fake_quantize, weight, self.weight_global_amax(), self.clip_gradient)
        return get_format(self.format_name).fake_quantize(weight, self.weight_global_amax(), self.clip_gradient)

    def quantized_weight(self) -> torch.Tensor:
        if self._held_weight is not None:
            return self._held_weight
        if self._step_held is None:
            return self._fake_quantize_weight(self.weight)
        return self.step_quantized("weight", self.weight, self._fake_quantize_weight, self.clip_gradient)

    @torch.no_grad()
    def hold_quantized_weight(self) -> None:
        self._held_weight = self._fake_quantize_weight(self.weight.detach())

    def release_quantized_weight(self) -> None:
        self._held_weight = None

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
        if self.arithmetic in SERVED_FUNCTIONS:
            out = straight_through(SERVED_FUNCTIONS[self.arithmetic][0], x, amax, self.clip_gradient)
        else:
            out = get_format(self.format_name).fake_quantize(x, amax, self.clip_gradient)
        if group is not None:
            group.last_input = (x, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic in SERVED_FUNCTIONS and torch.is_autocast_enabled(x.device.type):
            # Under bf16 autocast (--compute-dtype) the served model's input quantizer sees bf16
            # activations; give it those, not the fp32 residual-stream values autocast would round later.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return F.linear(self.quantized_input(x), self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        mode = "w4a4" if self.quantize_input else "w4a16"
        runtime = f", {self.arithmetic} arithmetic" if self.arithmetic != "reference" else ""
        return f"in={self.in_features}, out={self.out_features}, format={self.format_name}, {mode}{runtime}"
