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

from dataclasses import dataclass, field

import torch
from torch import nn

from ckaqad.errors import ExportError
from ckaqad.export.layouts import PRODUCER, Layout, get_layout
from ckaqad.formats import nvfp4
from ckaqad.models.arch import tied_output_name
from ckaqad.quant.apply import quant_linears
from ckaqad.quant.linear import QuantLinear

# Unquantized tensors are written in the teacher's deployment precision.
DENSE_DTYPE = torch.bfloat16
# A QuantLinear's own state-dict entries (replaced by the layout's tensors).
MODULE_TENSORS = ("weight", "bias", "input_amax", "weight_amax")


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

    @property
    def modules(self) -> list[str]:
        return list(self.weight_amax)

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
    """The student's QuantLinear layers; ExportError unless they are all NVFP4 with one scheme."""
    layers = quant_linears(student)
    if not layers:
        raise ExportError("the model has no quantized Linear layers: export a student made by build_ptq_student")
    other = sorted({m.format_name for m in layers.values()} - {"nvfp4"})
    if other:
        raise ExportError(f"only NVFP4 students can be exported to NVFP4 layouts; this student is {other[0]}")
    if len({m.quantize_input for m in layers.values()}) > 1:
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


def scales_of(model: nn.Module) -> Scales:
    """The `Scales` of an NVFP4 student, from its QuantLinear names and buffers. Call
    `quant.apply.freeze_scales(model)` first: it writes the weight global amaxes the forward uses."""
    layers = check_nvfp4_student(model)
    w4a4 = next(iter(layers.values())).quantize_input
    return scales_from_state_dict(model.state_dict(), list(layers), w4a4, checked_tied_output(model))


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
    layout = get_layout(layout)
    owned = {f"{name}.{local}": name for name in scales.modules for local in MODULE_TENSORS}
    missing = [f"{name}.weight" for name in scales.modules if f"{name}.weight" not in state_dict]
    if missing:
        raise ExportError(f"the state dict has no weight for the quantized modules {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = owned.get(key)
        if name is None:
            if key != scales.tied_output:
                out[key] = _dense(tensor)
        elif key == f"{name}.weight":
            locals_ = compress_linear(tensor, scales.weight_amax[name], scales.input_amax.get(name), layout)
            out.update({f"{name}.{local}": t for local, t in locals_.items()})
        elif key == f"{name}.bias":
            out[key] = _dense(tensor)
    return out


def scales_record(scales: Scales, layout: str | Layout) -> dict:
    """`ckaqad_scales.json`: the exact float32 amaxes as hex, so `decompress` reproduces the student bit for
    bit (module docstring)."""
    return {"producer": dict(PRODUCER), "layout": get_layout(layout).name, "scheme": scales.scheme,
            "weight_global_amax": {name: float(a).hex() for name, a in scales.weight_amax.items()},
            "input_amax": {name: float(a).hex() for name, a in scales.input_amax.items()}}


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

