"""Pure maps between a student's state dict and an export's tensors, both ways. No modules are read and no
input is modified, so the maps run on a live model's `state_dict()`, on a state dict gathered across ranks,
or on one loaded from safetensors.

A student's state dict holds, per quantized Linear `p`: `p.weight` `[out, in]`, `p.bias`, `p.input_amax`
and `p.weight_amax` (float32 scalars; `quant.apply.freeze_scales` writes into `weight_amax` the global amax
the forward uses, group-wide for fused siblings). `compress` turns each into the layout's packed codes,
FP8 block scales and global scales (`export.layouts`, docs/method.md#export-layouts), computed with
exactly the numbers of the student's forward: `nvfp4.quantize(weight.float(), weight_amax)`, so fused
siblings share one global scale. Every other floating-point tensor (embeddings, norms, lm_head, excluded
Linear layers, biases) is copied in bfloat16 under its usual name, integer buffers as they are; a tied
output embedding is left out.
`decompress` is the way back: dequantized weights `code · s8 · g` and the recovered amaxes.

Mixture-of-Experts (docs/moe_export.md#export). A quantized fused-experts module `m` (`quant.experts`) holds
`m.gate_up_proj` `[E, 2I, H]` (or `up_proj`; gpt_oss transposed and interleaved) and its amax buffers; the export
writes each expert's projection as its own quantized Linear under the name the model's own `save_pretrained`
writes (`…experts.{e}.gate_proj|up_proj|down_proj`, mixtral `…block_sparse_moe.experts.{e}.w1|w3|w2`,
nemotron_h `backbone.…mixer.experts.{e}.up_proj|down_proj`; gpt_oss, which `save_pretrained` keeps fused,
`…experts.{e}.gate_proj|up_proj|down_proj` as llm-compressor writes it), which is what vLLM's MoE loaders
stack into w13 / w2. Every other tensor is written under its `save_pretrained` name too (`CheckpointNames`):
`decompress` returns those names, and `to_state_dict` maps them back and re-fuses the experts.

Exactness of the way back. The student's numbers depend on its amax only through `g = fl32(amax / 2688)`.
The modelopt layout stores `g` itself (`layouts.amax_from_global` finds an amax giving exactly that `g`).
The compressed-tensors layout stores `G = fl32(2688 / amax)`, and no function of `G` recovers `g`: where
the mantissa of `g` exceeds √2 the float32 grid of `g` is finer than that of `G`, so several `g` share one
`G` (7% of uniformly random amaxes come back one ulp off). The export therefore also writes
`ckaqad_scales.json` (`scales_record`), the exact float32 amaxes as hex strings — a JSON file that vLLM
and TensorRT-LLM ignore, so no extra tensor reaches their loaders. `decompress` uses it when it agrees
with the tensors (`layouts.amax_from_reciprocal`) and falls back to `2688/G` otherwise (then g may be one
ulp off, and the logits move by float32 rounding).

>>> import torch
>>> weight = torch.linspace(-1, 1, 32).reshape(2, 16)
>>> student = {"p.weight": weight, "p.weight_amax": weight.abs().amax(), "p.input_amax": torch.tensor(0.0)}
>>> scales = scales_from_state_dict(student, ["p"], w4a4=False)
>>> sorted(compress(student, scales, "modelopt"))
['p.weight', 'p.weight_scale', 'p.weight_scale_2']
>>> back = decompress(compress(student, scales, "modelopt"), "modelopt", w4a4=False)
>>> torch.equal(back["p.weight"], nvfp4.quantize(weight, weight.abs().amax()).dequantize())
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ckaqad.errors import ExportError
from ckaqad.export.layouts import PRODUCER, Layout, get_layout
from ckaqad.formats import nvfp4
from ckaqad.models.arch import (
    ExpertsLayout,
    checkpoint_expert_names,
    expert_modules,
    experts_layout,
    tied_output_name,
)
from ckaqad.quant.apply import quant_experts, quant_linears
from ckaqad.quant.experts import QuantExperts
from ckaqad.quant.linear import QuantLinear

# Unquantized tensors are written in the teacher's deployment precision.
DENSE_DTYPE = torch.bfloat16
# A QuantLinear's own state-dict entries (replaced by the layout's tensors).
MODULE_TENSORS = ("weight", "bias", "input_amax", "weight_amax")


@dataclass(frozen=True)
class CheckpointNames:
    """Where a model's tensors go in its checkpoint (what its own `save_pretrained` writes).

    `renames`: state-dict key -> checkpoint key, for the keys that differ (nemotron_h `model.` -> `backbone.`,
    mixtral's router `mlp.gate` -> `block_sparse_moe.gate`); `experts`: per fused-experts module, its layout and
    the checkpoint module name of each `(expert, canonical projection)`.
    """

    renames: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[ExpertsLayout, dict[tuple[int, str], str]]] = field(default_factory=dict)

    def key(self, key: str) -> str:
        return self.renames.get(key, key)

    def module(self, name: str) -> str:
        """The checkpoint name of module `name` (from its `.weight` key)."""
        return module_name(self.key(f"{name}.weight"))

    def state_dict_keys(self) -> dict[str, str]:
        """checkpoint key -> state-dict key (the inverse of `renames`)."""
        return {v: k for k, v in self.renames.items()}


@dataclass(frozen=True)
class ExpertScales:
    """The global amaxes of one quantized fused-experts module: `weight_amax` `{proj: [E]}` (gate and up of an
    expert share theirs), `input_amax` `{proj: scalar}` (W4A4; shared by the layer's experts; empty for W4A16)."""

    weight_amax: dict[str, torch.Tensor]
    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Scales:
    """Which modules of a state dict are quantized, with the global amaxes their forward uses.

    `weight_amax` maps each quantized module to its weight global amax (float32 scalar, CPU), in state-dict
    order; `input_amax` holds the calibrated activation amaxes of a W4A4 student (empty for W4A16);
    `tied_output` is the state-dict key of an output embedding tied to the input embedding (not written).
    """

    weight_amax: dict[str, torch.Tensor]
    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    w4a4: bool = True
    tied_output: str | None = None
    experts: dict[str, ExpertScales] = field(default_factory=dict)
    """per quantized fused-experts module (state-dict name), its global amaxes"""
    names: CheckpointNames = field(default_factory=CheckpointNames)
    """the checkpoint names the export writes (`checkpoint_names(model)`; identity by default)"""

    @property
    def modules(self) -> list[str]:
        return list(self.weight_amax)

    def expert_projections(self) -> list[str]:
        """The checkpoint module names of every quantized expert projection."""
        return [prefix for m in self.experts for prefix in self.names.experts[m][1].values()]

    @property
    def scheme(self) -> str:
        return "w4a4" if self.w4a4 else "w4a16"


def _checked_amax(name: str, what: str, amax: torch.Tensor, hint: str) -> torch.Tensor:
    amax = amax.detach().float().cpu().reshape(())
    if not (torch.isfinite(amax) and amax > 0):
        raise ExportError(f"{name}: {what} amax is {amax.item()} ({hint}); "
                          "an NVFP4 checkpoint needs a finite positive global scale")
    return amax.clone()


def scales_from_state_dict(state_dict: dict[str, torch.Tensor], modules: list[str], w4a4: bool,
                           tied_output: str | None = None) -> Scales:
    """`Scales` read from the `p.weight_amax` / `p.input_amax` entries of a student's state dict (after
    `freeze_scales`), checked to be finite and positive. `modules` lists the quantized modules."""
    weight, inputs = {}, {}
    for name in modules:
        for local in ("weight", "weight_amax") + (("input_amax",) if w4a4 else ()):
            if f"{name}.{local}" not in state_dict:
                raise ExportError(f"the state dict has no {name}.{local} for the quantized module {name}")
        weight[name] = _checked_amax(name, "weight global", state_dict[f"{name}.weight_amax"],
                                     "weight scales not frozen: run quant.apply.freeze_scales()")
        if w4a4:
            inputs[name] = _checked_amax(name, "input", state_dict[f"{name}.input_amax"],
                                         "W4A4 student not calibrated: run calibrate()")
    return Scales(weight_amax=weight, input_amax=inputs, w4a4=w4a4, tied_output=tied_output)


def check_nvfp4_student(student: nn.Module) -> dict[str, QuantLinear]:
    """The student's QuantLinear layers; ExportError unless they and its quantized experts are all NVFP4 with
    one scheme."""
    layers, experts = quant_linears(student), quant_experts(student)
    if not layers and not experts:
        raise ExportError("the model has no quantized Linear layers: export a student made by build_ptq_student")
    formats = {m.format_name for m in layers.values()} | {m.quant_config.format for m in experts.values()}
    other = sorted(formats - {"nvfp4"})
    if other:
        raise ExportError(f"only NVFP4 students can be exported to NVFP4 layouts; this student is {other[0]}")
    if len({m.quantize_input for m in (*layers.values(), *experts.values())}) > 1:
        raise ExportError("the student mixes W4A4 and W4A16 layers; an export holds one scheme")
    return layers


def checked_tied_output(model: nn.Module) -> str | None:
    """`models.arch.tied_output_name`, checked: a tied head must be unquantized and truly share the weight."""
    name = tied_output_name(model)
    if name is None:
        return None
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, QuantLinear):
        raise ExportError(f"{module_name(name)} is tied to the input embeddings and cannot be quantized; exclude it")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ExportError(f"config.tie_word_embeddings is true but {name} differs from the input embeddings; "
                          "untie them in the config or tie the weights")
    return name


def module_name(key: str) -> str:
    return key.rpartition(".")[0]


def checkpoint_names(model: nn.Module) -> CheckpointNames:
    """The names the model's own `save_pretrained` gives its tensors and its experts' projections: transformers'
    `revert_weight_conversion` run on a stand-in state dict whose every tensor is a distinct tag (so no family's
    renaming is re-typed here), and `models.arch.checkpoint_expert_names` for the experts (gpt_oss, which
    `save_pretrained` keeps fused: `<experts>.{e}.<proj>`, llm-compressor's spelling)."""
    from transformers.core_model_loading import revert_weight_conversion

    experts = expert_modules(model)
    inside = tuple(f"{name}." for name in experts)
    keys = [k for k in model.state_dict() if not k.startswith(inside)] if inside else list(model.state_dict())
    try:
        saved = revert_weight_conversion(model, {k: torch.tensor([float(i)]) for i, k in enumerate(keys)})
    except Exception as exc:  # a model without conversion rules may not support the call
        raise ExportError(f"cannot find the checkpoint names of {type(model).__name__}: {exc}") from exc
    if len(saved) != len(keys) or any(t.numel() != 1 for t in saved.values()):
        raise ExportError(f"{type(model).__name__}'s save_pretrained merges or splits tensors outside its experts; "
                          "ckaqad cannot export it")
    renames = {keys[int(t.item())]: key for key, t in saved.items() if keys[int(t.item())] != key}
    names = {}
    for name, module in experts.items():
        layout = module.layout if isinstance(module, QuantExperts) else experts_layout(module)
        found = checkpoint_expert_names(model, name)
        if found is None:
            count = module._parameters[layout.input_param].shape[0]
            names[name] = (layout, {(e, p): f"{name}.{e}.{p}" for e in range(count) for p in layout.projections})
        else:
            names[name] = (layout, {ep: module_name(key) for ep, key in found.items()})
    return CheckpointNames(renames=renames, experts=names)


def scales_of(model: nn.Module) -> Scales:
    """The `Scales` of an NVFP4 student, from its quantized modules' names and buffers, with the checkpoint names
    (`checkpoint_names`). Call `quant.apply.freeze_scales(model)` first: it writes the weight global amaxes the
    forward uses."""
    layers = check_nvfp4_student(model)
    experts = quant_experts(model)
    w4a4 = next(iter((*layers.values(), *experts.values()))).quantize_input
    scales = scales_from_state_dict(model.state_dict(), list(layers), w4a4, checked_tied_output(model))
    expert_scales = {}
    for name, m in experts.items():
        weight = {p: _checked_amaxes(f"{name}.{p}", a) for p, a in m.weight_global_amaxes().items()}
        inputs = {p: _checked_amax(f"{name}.{p}", "input", a, "W4A4 student not calibrated: run calibrate()")
                  for p, a in m.input_amaxes().items()}
        expert_scales[name] = ExpertScales(weight, inputs)
    return dataclasses.replace(scales, experts=expert_scales, names=checkpoint_names(model))


def _checked_amaxes(name: str, amax: torch.Tensor) -> torch.Tensor:
    """Per-expert weight global amaxes [E], checked finite and positive (an unreached expert has one too)."""
    amax = amax.detach().float().cpu().clone()
    bad = (~torch.isfinite(amax) | (amax <= 0)).nonzero()
    if bad.numel():
        e = int(bad[0, 0])
        raise ExportError(f"{name}: expert {e}'s weight global amax is {amax[e].item()}; an NVFP4 checkpoint needs "
                          "a finite positive global scale (run quant.apply.freeze_scales())")
    return amax


# ------------------------------------------------------------------------------------------- compress


def compress_linear(weight: torch.Tensor, weight_amax: torch.Tensor, input_amax: torch.Tensor | None,
                    layout: str | Layout) -> dict[str, torch.Tensor]:
    """One quantized Linear's tensors under their local names (new contiguous CPU tensors).

    `weight` `[out, in]` (in a multiple of 16), `weight_amax` the amax its global scale comes from (the
    fused group's for siblings), `input_amax` the calibrated activation amax for W4A4, else None.
    """
    layout = get_layout(layout)
    q = nvfp4.quantize(weight.detach().float(), weight_amax)
    out = {layout.names.packed: nvfp4.pack(q.codes).cpu(), layout.names.block_scales: q.block_scales.cpu(),
           **layout.store_globals(weight_amax, input_amax)}
    return {name: t.contiguous() for name, t in out.items()}


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    dtype = DENSE_DTYPE if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", dtype, copy=True).contiguous()


def compress(state_dict: dict[str, torch.Tensor], scales: Scales, layout: str | Layout) -> dict[str, torch.Tensor]:
    """The export's tensors, name -> new CPU tensor, in state-dict order (see the module docstring).

    `state_dict` is a student's (name -> tensor, any device); `scales` names its quantized modules and their
    global amaxes (`scales_of(model)`, or `scales_from_state_dict` for a state dict without a model).
    """
    check_quantized_weights(state_dict, scales)
    compressor = EntryCompressor(scales, layout)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        out.update(compressor(key, tensor))
    return out


def check_quantized_weights(keys, scales: Scales) -> None:
    """ExportError unless the state-dict `keys` hold the weight of every quantized module."""
    missing = [f"{name}.weight" for name in scales.modules if f"{name}.weight" not in keys]
    if missing:
        raise ExportError(f"the state dict has no weight for the quantized modules {missing[:3]}")


class EntryCompressor:
    """`compress` one state-dict entry at a time: `compressor(key, tensor)` -> that entry's export tensors
    (none for a tied output embedding or a scale buffer that is folded into its layer's tensors). The streaming
    export (`export.writer`) feeds it a block's entries at a time; `compress` feeds it a whole state dict."""

    def __init__(self, scales: Scales, layout: str | Layout) -> None:
        self.scales, self.layout = scales, get_layout(layout)
        self.owned = {f"{name}.{local}": name for name in scales.modules for local in MODULE_TENSORS}
        # A quantized experts module's state-dict entries: its fused parameters, their biases and its scale buffers.
        self.expert_of: dict[str, str] = {}
        for name in scales.experts:
            expert_layout = scales.names.experts[name][0]
            for param in expert_layout.fused:
                self.expert_of.update(dict.fromkeys((f"{name}.{param}", f"{name}.{param}_weight_amax",
                                                     f"{name}.{param}_input_amax"), name))
            self.expert_of.update(dict.fromkeys([f"{name}.{b}" for b in expert_layout.biases.values()] +
                                                [f"{name}.calib_tokens"], name))

    def __call__(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        scales, layout, names = self.scales, self.layout, self.scales.names
        name = self.owned.get(key)
        if key in self.expert_of:
            return _compress_experts_entry(key, tensor, self.expert_of[key], scales, layout)
        if name is None:
            return {} if key == scales.tied_output else {names.key(key): _dense(tensor)}
        if key == f"{name}.weight":
            locals_ = compress_linear(tensor, scales.weight_amax[name], scales.input_amax.get(name), layout)
            return {f"{names.module(name)}.{local}": t for local, t in locals_.items()}
        if key == f"{name}.bias":
            return {names.key(key): _dense(tensor)}
        return {}


def _compress_experts_entry(key: str, tensor: torch.Tensor, module: str, scales: Scales,
                            layout: Layout) -> dict[str, torch.Tensor]:
    """The export tensors of one state-dict entry of a quantized experts module: a fused parameter becomes each
    expert's projections (`compress_linear` per expert, with its own weight global amax and the layer's input
    amax), a fused bias each expert's `bias`; the scale buffers write nothing (their values are in the scales)."""
    expert_layout, prefixes = scales.names.experts[module]
    local = key[len(module) + 1:]
    amaxes = scales.experts[module]
    out: dict[str, torch.Tensor] = {}
    if local in expert_layout.fused:
        for proj, weights in expert_layout.split(local, tensor.detach()).items():  # [E, out, in]
            for e in range(weights.shape[0]):
                parts = compress_linear(weights[e], amaxes.weight_amax[proj][e], amaxes.input_amax.get(proj), layout)
                out.update({f"{prefixes[(e, proj)]}.{name}": t for name, t in parts.items()})
    param = next((p for p, b in expert_layout.biases.items() if b == local), None)
    if param is not None:
        for proj, biases in expert_layout.split(param, tensor.detach()).items():  # [E, out]
            out.update({f"{prefixes[(e, proj)]}.bias": _dense(biases[e]) for e in range(biases.shape[0])})
    return out


def scales_record(scales: Scales, layout: str | Layout) -> dict:
    """`ckaqad_scales.json`: the exact float32 amaxes as hex, so `decompress` reproduces the student bit for
    bit (module docstring)."""
    names = scales.names
    weight = {names.module(name): float(a).hex() for name, a in scales.weight_amax.items()}
    inputs = {names.module(name): float(a).hex() for name, a in scales.input_amax.items()}
    for module, amaxes in scales.experts.items():
        for (e, proj), prefix in names.experts[module][1].items():
            weight[prefix] = float(amaxes.weight_amax[proj][e]).hex()
            if proj in amaxes.input_amax:
                inputs[prefix] = float(amaxes.input_amax[proj]).hex()
    return {"producer": dict(PRODUCER), "layout": get_layout(layout).name, "scheme": scales.scheme,
            "weight_global_amax": weight, "input_amax": inputs}


# ----------------------------------------------------------------------------------------- decompress


def quantized_modules(tensors: dict[str, torch.Tensor], layout: str | Layout) -> list[str]:
    """Names of the quantized modules of an export (those with FP8 block scales), sorted."""
    block_scales = f".{get_layout(layout).names.block_scales}"
    return sorted(module_name(key) for key, t in tensors.items()
                  if key.endswith(block_scales) and t.dtype == torch.float8_e4m3fn)


def _layer_tensors(tensors: dict, name: str, layout: Layout, w4a4: bool, where: str) -> dict[str, torch.Tensor]:
    local = {k: tensors.get(f"{name}.{k}") for k in layout.names.of(w4a4)}
    missing = [f"{name}.{k}" for k, t in local.items() if t is None]
    if missing:
        raise ExportError(f"{where}: missing tensors {missing}")
    packed, block_scales = local[layout.names.packed], local[layout.names.block_scales]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or block_scales.dim() != 2 \
            or packed.shape[0] != block_scales.shape[0] \
            or 2 * packed.shape[1] != nvfp4.BLOCK_SIZE * block_scales.shape[1]:
        raise ExportError(f"{where}: {name} has packed {tuple(packed.shape)} {packed.dtype} and scales "
                          f"{tuple(block_scales.shape)}, which do not describe one Linear weight")
    return local


def decompress(tensors: dict[str, torch.Tensor], layout: str | Layout, w4a4: bool, record: dict | None = None,
               where: str = "export") -> dict[str, torch.Tensor]:
    """A student state dict from an export's tensors: the inverse of `compress`.

    Each quantized module `p` gets `p.weight` (float32 `[out, in]`, `code · s8 · g`: exactly the student's
    quantized weight), `p.weight_amax` and `p.input_amax` (float32 scalars; the input amax is 0 for W4A16);
    every other tensor (biases included) is passed through as it is stored — the same tensor objects,
    not copies. `record` is the parsed `ckaqad_scales.json` (module docstring); `where` names the export in
    errors. ExportError for missing or inconsistent tensors.
    """
    layout = get_layout(layout)
    record = record or {}
    recorded_w, recorded_in = record.get("weight_global_amax") or {}, record.get("input_amax") or {}
    modules = quantized_modules(tensors, layout)
    consumed = {f"{name}.{local}" for name in modules for local in layout.names.of(w4a4)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key not in consumed:
            out[key] = tensor
    for name in modules:
        local = _layer_tensors(tensors, name, layout, w4a4, where)
        weight_amax, input_amax = layout.recover_amaxes(local, recorded_w.get(name), recorded_in.get(name))
        codes = nvfp4.unpack(local[layout.names.packed])
        g = nvfp4.global_scale_from_amax(weight_amax)
        out[f"{name}.weight"] = nvfp4.NVFP4Tensor(codes, local[layout.names.block_scales], g).dequantize()
        out[f"{name}.weight_amax"] = weight_amax
        out[f"{name}.input_amax"] = input_amax if input_amax is not None else torch.zeros((), dtype=torch.float32)
    return out


def requantizes_exactly(weight: torch.Tensor, weight_amax: torch.Tensor, packed: torch.Tensor,
                        block_scales: torch.Tensor) -> bool:
    """Whether re-quantizing a decompressed weight gives back the stored codes and block scales. It fails only
    for blocks whose FP8 scale is subnormal and whose largest code is below 6."""
    again = nvfp4.quantize(weight, weight_amax)
    return torch.equal(nvfp4.pack(again.codes), packed) and torch.equal(
        again.block_scales.view(torch.uint8), block_scales.view(torch.uint8))



def to_state_dict(state: dict[str, torch.Tensor], names: CheckpointNames, quantized_experts: list[str],
                  where: str = "export") -> dict[str, torch.Tensor]:
    """A student's state dict from `decompress`'s output (checkpoint names): keys renamed back and each quantized
    experts module's per-expert projections fused again (`ExpertsLayout.merge`) with its amax buffers
    (`<param>_weight_amax` [E], `<param>_input_amax`, `calib_tokens` zeros: calibration counts are not
    exported). ExportError where gate and up of an expert, or the experts of a projection's input, carry
    different global amaxes (the student's forward cannot hold them)."""
    back = names.state_dict_keys()
    consumed: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for module in quantized_experts:
        layout, prefixes = names.experts[module]
        count = 1 + max(e for e, _ in prefixes)
        for param, projs in layout.fused.items():
            parts, amaxes, inputs = {}, [], []
            for proj in projs:
                keys = [prefixes[(e, proj)] for e in range(count)]
                missing = [k for k in keys if f"{k}.weight" not in state]
                if missing:
                    raise ExportError(f"{where}: missing tensors for the experts {missing[:3]}")
                parts[proj] = torch.stack([state[f"{k}.weight"] for k in keys])
                amaxes.append(torch.stack([state[f"{k}.weight_amax"].reshape(()) for k in keys]))
                inputs.append(torch.stack([state[f"{k}.input_amax"].reshape(()) for k in keys]))
                consumed.update(f"{k}.{t}" for k in keys for t in ("weight", "weight_amax", "input_amax"))
            if any(not torch.equal(a, amaxes[0]) for a in amaxes[1:]):
                raise ExportError(f"{where}: {module}: {'/'.join(projs)} of an expert have different weight global "
                                  "scales (vLLM fuses them into one GEMM with one scale)")
            stacked = torch.stack(inputs)
            if not bool((stacked == stacked.flatten()[0]).all()):
                raise ExportError(f"{where}: {module}: the experts' input global scales of {'/'.join(projs)} differ; "
                                  "ckaqad's experts share one per projection")
            out[f"{module}.{param}"] = layout.merge(param, parts)
            out[f"{module}.{param}_weight_amax"] = amaxes[0]
            out[f"{module}.{param}_input_amax"] = stacked.flatten()[0].clone()
            if param in layout.biases:
                bias_keys = [f"{prefixes[(e, proj)]}.bias" for proj in projs for e in range(count)]
                if all(k in state for k in bias_keys):
                    out[f"{module}.{layout.biases[param]}"] = layout.merge(param, {
                        proj: torch.stack([state[f"{prefixes[(e, proj)]}.bias"] for e in range(count)])
                        for proj in projs})
                    consumed.update(bias_keys)
        out[f"{module}.calib_tokens"] = torch.zeros(count, dtype=torch.int64)
    for key, tensor in state.items():
        if key in consumed:
            continue
        out[_state_key(key, back)] = tensor
    return out


def _state_key(key: str, back: dict[str, str]) -> str:
    """The state-dict key of checkpoint key `key`: renamed back directly, or through its module's `.weight`
    (a quantized Linear's `weight_amax` / `input_amax`, which the checkpoint does not hold)."""
    if key in back:
        return back[key]
    module, _, local = key.rpartition(".")
    renamed = back.get(f"{module}.weight")
    return f"{module_name(renamed)}.{local}" if renamed is not None else key
