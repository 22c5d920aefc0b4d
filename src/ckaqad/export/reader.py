"""Reading an NVFP4 export (either layout) back: what it holds (`inspect_export`, `is_export_dir`), its
tensors (`read_tensors`) and the fake-quantized student it was written from (`load_export`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from torch import nn

from ckaqad.errors import ExportError
from ckaqad.export.compress import (
    checkpoint_names,
    decompress,
    quantized_modules,
    requantizes_exactly,
    to_state_dict,
)
from ckaqad.export.layouts import Layout, detect, read_json
from ckaqad.export.shards import weight_files
from ckaqad.models.arch import tied_output_name
from ckaqad.paths import ExportDir
from ckaqad.quant.apply import quant_experts, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig

logger = logging.getLogger(__name__)


@dataclass
class ExportInfo:
    """What an export directory holds: its layout, its scheme, config.json and its weight files."""

    root: Path
    layout: Layout
    w4a4: bool
    config: dict
    weight_files: list[Path]


def inspect_export(export_dir: str | os.PathLike) -> ExportInfo:
    """Layout, scheme and weight files of an export directory; ExportError if it is not one."""
    export = ExportDir(Path(export_dir).expanduser())
    if not export.root.exists():
        raise ExportError(f"export directory {export.root} does not exist")
    if not export.root.is_dir():
        raise ExportError(f"{export.root} is not a directory")
    found = detect(export.root)
    try:
        files = weight_files(export.root)  # the index's files, else model.safetensors
    except ValueError as exc:  # an index that is not JSON or has no weight_map
        raise ExportError(f"{export.shard_index} is not a shard index: {exc}") from exc
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ExportError(f"{export.root} is incomplete: missing {', '.join(missing)}")
    return ExportInfo(root=export.root, layout=found.layout, w4a4=found.w4a4, config=found.config,
                      weight_files=files)


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding an NVFP4 export in either layout (config + weight files present)."""
    try:
        inspect_export(path)
    except ExportError:
        return False
    return True


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors `files`, on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(safetensors_torch.load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ExportError(f"cannot read {path}: {exc}") from exc
    return tensors


def read_scales_record(export_dir: Path) -> dict:
    """The parsed `ckaqad_scales.json` (exact amaxes; `export.compress`), or {} when the export has none."""
    path = ExportDir(export_dir).scales
    return read_json(path) if path.is_file() else {}


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise ExportError(f"cannot load the tokenizer in {directory}: {exc}") from exc


def _build_model(export_dir: Path, config_dict: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = data.pop("model_type", None)
    where = ExportDir(export_dir).config
    if model_type is None:
        raise ExportError(f"{where} has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # unknown architectures, bad configs
        raise ExportError(f"cannot build the model described by {where}: {exc}") from exc


def _fill(model: nn.Module, state: dict[str, torch.Tensor], export_dir: Path) -> None:
    """Copy `state` into the model's parameters and buffers (the tied output embedding comes with its input
    embedding); ExportError for a missing, misshapen or unused tensor."""
    skip = tied_output_name(model)
    used: set[str] = set()
    for key, target in model.state_dict(keep_vars=True).items():
        if key == skip:
            continue
        if key not in state:
            raise ExportError(f"{export_dir}: missing tensor {key}")
        source = state[key]
        if tuple(source.shape) != tuple(target.shape):
            raise ExportError(f"{export_dir}: {key} has shape {tuple(source.shape)}, the model expects "
                              f"{tuple(target.shape)}")
        target.data.copy_(source.to(target.dtype))
        used.add(key)
    extra = sorted(set(state) - used)
    if extra:
        raise ExportError(f"{export_dir}: tensors that the model does not use: {extra[:5]}")


@torch.no_grad()
def to_served_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`model.to(dtype)` in place, but holding what transformers' `from_pretrained(dtype=...)` holds in
    float32: the rotary `inv_freq` buffers (computed in float32 at init, never cast). A plain `.to(bfloat16)`
    rounds them and moves the logits. Runtime-arithmetic QuantLinear amaxes stay float32 by themselves."""
    kept = {name: b.clone() for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, value in kept.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[attr] = value.to(module._buffers[attr].device)
    return model


@torch.no_grad()
def load_export(export_dir: str | os.PathLike, device: str | torch.device = "cpu",
                arithmetic: str = "reference") -> tuple[nn.Module, object]:
    """Read an export (either layout) back as a fake-quantized float32 student in eval mode, with its
    tokenizer.

    Quantized layers get weight = the dequantized codes (`code · s8 · g`, exactly the student's quantized
    weight) and frozen global amaxes; re-quantizing that weight in the forward returns the same codes and
    scales, so the logits equal the exported student's (bit for bit with `ckaqad_scales.json`, see
    `export.compress`; unquantized tensors are the bfloat16 values that were written). Gradients are off.

    `arithmetic` goes into the rebuilt QuantConfig: "runtime" computes what compressed-tensors' served forward
    computes; `to_served_dtype(model)` (bf16) then gives the logits transformers gives for this export, bit for
    bit (its amaxes stay float32, see `QuantLinear`).
    """
    info = inspect_export(export_dir)
    root = info.root
    tensors = read_tensors(info.weight_files)
    quantized = quantized_modules(tensors, info.layout)
    model = _build_model(root, info.config)
    # The export holds checkpoint names (what the model's save_pretrained writes; per-expert projections).
    names = checkpoint_names(model)
    linears = {names.module(name): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expert_of = {prefix: module for module, (_, prefixes) in names.experts.items() for prefix in prefixes.values()}
    unknown = sorted(set(quantized) - set(linears) - set(expert_of))
    if unknown:
        raise ExportError(f"{root}: quantized tensors for modules the model does not have: {unknown[:3]}")
    quantized_linears = sorted(linears[q] for q in quantized if q in linears)
    quantized_experts = sorted({expert_of[q] for q in quantized if q in expert_of})
    partial = [m for m in quantized_experts if not set(names.experts[m][1].values()) <= set(quantized)]
    if partial:
        raise ExportError(f"{root}: the experts of {partial[0]} are quantized only in part")
    config = QuantConfig(format="nvfp4", scheme="w4a4" if info.w4a4 else "w4a16", weight_global="frozen",
                         arithmetic=arithmetic)
    quantize_model_(model, config, only=quantized_linears + quantized_experts)
    if sorted(quant_linears(model)) != quantized_linears or sorted(quant_experts(model)) != quantized_experts:
        raise ExportError(f"{root}: the quantized layers in the checkpoint do not match the model")
    state = decompress(tensors, info.layout, info.w4a4, read_scales_record(root), where=str(root))
    local = info.layout.names
    changed = [name for name in quantized
               if not requantizes_exactly(state[f"{name}.weight"], state[f"{name}.weight_amax"],
                                          tensors[f"{name}.{local.packed}"], tensors[f"{name}.{local.block_scales}"])]
    if changed:
        logger.warning("%d layers re-quantize to different codes than stored (blocks with subnormal FP8 scales), "
                       "first %s; their forward differs from the export", len(changed), changed[0])
    _fill(model, to_state_dict(state, names, quantized_experts, where=str(root)), root)
    tokenizer = load_tokenizer(root)
    model.to(torch.device(device)).eval().requires_grad_(False)
    return model, tokenizer


def load_served(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """A compressed-tensors export loaded exactly as a user of transformers loads it:
    `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16, local_files_only=True)` (transformers'
    compressed-tensors integration decompresses the NVFP4 weights), in eval mode without gradients, with the
    export's tokenizer. ExportError for a ModelOpt export (transformers does not serve that layout) or a load
    that fails."""
    from transformers import AutoModelForCausalLM

    info = inspect_export(export_dir)
    if info.layout.name != "compressed-tensors":
        raise ExportError(f"{info.root} is a {info.layout.name} export; the transformers runtime reads "
                          "compressed-tensors exports only")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(info.root), dtype=torch.bfloat16, local_files_only=True)
    except Exception as exc:  # transformers and compressed-tensors raise many types for unreadable checkpoints
        raise ExportError(f"transformers cannot load {info.root}: {exc}") from exc
    repaired = repair_served_experts(model, read_tensors(info.weight_files), info)
    if repaired:
        logger.warning("transformers dequantized %d NVFP4 expert tensors without their weight_global_scale "
                       "(huggingface/transformers#48371); ckaqad decompressed them again with it "
                       "(docs/moe_export.md#reloading-in-transformers)", repaired)
    model.to(torch.device(device)).eval().requires_grad_(False)
    return model, load_tokenizer(info.root)


@torch.no_grad()
def repair_served_experts(model: nn.Module, tensors: dict[str, torch.Tensor], info: ExportInfo) -> int:
    """Put the right weights into the fused experts of a model that transformers loaded from a compressed-tensors
    NVFP4 export; returns how many fused tensors were wrong (0 once transformers is fixed).

    transformers 5.25's `CompressedTensorsDequantize` rebuilds each expert projection as a stand-in module with
    `weight_packed`, `weight_scale` and `weight_shape` only, so compressed-tensors dequantizes it as
    `code · s8` without dividing by `weight_global_scale` (huggingface/transformers#48371, PR #48372): every expert
    comes back scaled by `2688/amax`, silently. Here each expert projection is decompressed by compressed-tensors'
    own `NVFP4PackedCompressor` with all its stored tensors (`Layout.serving_weight`), cast to the model's dtype
    as transformers casts it, and fused with `ExpertsLayout.merge`. Experts run weight-only (W4A16) in
    transformers either way: it has no activation quantizer for them (their `input_global_scale` load as
    unexpected keys).
    """
    # transformers' quantized model carries loading converters that cannot be reverted: read the names from the
    # same architecture built plain, on the meta device.
    with torch.device("meta"):
        plain = _build_model(info.root, info.config)
    names = checkpoint_names(plain)
    qconfig = info.config.get("quantization_config") or {}
    local = info.layout.names
    wrong = 0
    for module_name_, (layout, prefixes) in names.experts.items():
        if not all(f"{p}.{local.packed}" in tensors for p in prefixes.values()):
            continue  # experts kept in high precision: transformers loaded them as they are
        module = model.get_submodule(module_name_)
        count = 1 + max(e for e, _ in prefixes)
        for param, projs in layout.fused.items():
            target = module._parameters[param]
            parts = {proj: torch.stack([
                info.layout.serving_weight({k: tensors[f"{prefixes[(e, proj)]}.{k}"] for k in local.of(False)},
                                           qconfig).to(target.dtype) for e in range(count)]) for proj in projs}
            fused = layout.merge(param, parts).to(target.device)
            if not torch.equal(fused, target):
                wrong += 1
                target.copy_(fused)
    return wrong
