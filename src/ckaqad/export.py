"""Deployable NVFP4 checkpoints of a fake-quantized student, and the loader that reads them back.

Two layouts (METHOD.md §3), both with the same codes and block scales:

- `compressed-tensors` (vLLM, llm-compressor), per quantized Linear `p`:
  `p.weight_packed` uint8 `[out, in/2]` (even column in the low nibble), `p.weight_scale` float8_e4m3fn
  `[out, in/16]`, `p.weight_global_scale` float32 `[1]` = `448·6/amax`, and for W4A4
  `p.input_global_scale` float32 `[1]` = `448·6/act_amax`; config.json `quantization_config` is built with
  compressed-tensors' own pydantic `QuantizationConfig` (format `nvfp4-pack-quantized`).
- `modelopt` (TensorRT-LLM, vLLM `modelopt_fp4`): `p.weight` uint8 packed, `p.weight_scale` fp8,
  `p.weight_scale_2` float32 scalar = `g = amax/(6·448)`, `p.input_scale` float32 scalar for W4A4, plus
  `hf_quant_config.json`.

Every other tensor (embeddings, norms, lm_head, excluded Linear layers, biases) is written in bfloat16 under
its usual name. The codes are computed with exactly the numbers the student's forward uses:
`nvfp4.quantize(weight.float(), module.weight_global_amax())`, so fused siblings share one global scale.

Exactness of the way back. The student's numbers depend on its amax only through `g = fl32(amax / 2688)`.
The modelopt layout stores `g` itself. The compressed-tensors layout stores `G = fl32(2688 / amax)`, and
no function of `G` recovers `g`: where the mantissa of `g` exceeds √2 the float32 grid of `g` is finer than
that of `G`, so several `g` share one `G` (7% of uniformly random amaxes come back one ulp off). The
export therefore also writes `ckaqad_scales.json`, the exact float32 amaxes as hex strings — a JSON file
that vLLM and TensorRT-LLM ignore, so no extra tensor reaches their loaders. `load` uses it when it agrees
with the tensors and falls back to `2688/G` otherwise (then g may be one ulp off, and the logits move by
float32 rounding).

>>> Layout("modelopt").value
'modelopt'
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from torch import nn

from ckaqad import __version__
from ckaqad.errors import ConfigError, ExportError, unknown_name
from ckaqad.files import atomic_directory, check_writable
from ckaqad.formats import nvfp4
from ckaqad.quantize import QuantConfig, QuantLinear, quant_linears, quantize_model_


class Layout(str, Enum):
    """On-disk layouts; the value is the spelling used by `--layout` and in `export_summary.json`."""

    COMPRESSED_TENSORS = "compressed-tensors"
    MODELOPT = "modelopt"


LAYOUTS = {layout.value: layout for layout in Layout}
CT_FORMAT = "nvfp4-pack-quantized"
CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
SCALES_FILE = "ckaqad_scales.json"
SUMMARY_FILE = "export_summary.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_SHARD = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Unquantized tensors are written in the teacher's deployment precision.
DENSE_DTYPE = torch.bfloat16
# 6 · 448: the ratio between a tensor's amax and its global scale g.
GLOBAL_RANGE = nvfp4.FP4_MAX * nvfp4.FP8_E4M3_MAX
# A QuantLinear's own state-dict entries (replaced by the layout's tensors).
_MODULE_TENSORS = ("weight", "bias", "input_amax", "weight_amax")
# Local tensor names of a quantized Linear, per layout: (packed, block scales, weight global, input global).
_LOCAL_NAMES = {
    Layout.COMPRESSED_TENSORS: ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"),
    Layout.MODELOPT: ("weight", "weight_scale", "weight_scale_2", "input_scale"),
}


def get_layout(name: str | Layout) -> Layout:
    """The `Layout` spelled `name` (ConfigError listing the valid ones otherwise)."""
    if isinstance(name, Layout):
        return name
    if name not in LAYOUTS:
        raise unknown_name("export layout (--layout)", str(name), LAYOUTS)
    return LAYOUTS[name]


# ----------------------------------------------------------------------------------- pure tensor mapping


def reciprocal_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' global scale `448·6 / amax` (float32 scalar), the reciprocal of g."""
    return torch.tensor(GLOBAL_RANGE, dtype=torch.float32) / amax.detach().float().cpu()


def compress_linear(weight: torch.Tensor, weight_amax: torch.Tensor, input_amax: torch.Tensor | None,
                    layout: Layout) -> dict[str, torch.Tensor]:
    """One quantized Linear's tensors under their local names (CPU, new tensors; the inputs are not touched).

    `weight` `[out, in]` (in a multiple of 16), `weight_amax` the amax its global scale comes from (the
    fused group's for siblings), `input_amax` the calibrated activation amax for W4A4, else None.
    """
    q = nvfp4.quantize(weight.detach().float(), weight_amax)
    packed_name, scale_name, global_name, input_name = _LOCAL_NAMES[layout]
    out = {packed_name: nvfp4.pack(q.codes).cpu(), scale_name: q.block_scales.cpu()}
    if layout is Layout.COMPRESSED_TENSORS:
        out[global_name] = reciprocal_global_scale(weight_amax).reshape(1)
        if input_amax is not None:
            out[input_name] = reciprocal_global_scale(input_amax).reshape(1)
    else:  # ModelOpt writes scalars (`.squeeze()` in its unified HF export)
        out[global_name] = q.global_scale.detach().float().cpu().reshape(())
        if input_amax is not None:
            out[input_name] = nvfp4.global_scale_from_amax(input_amax.detach().float().cpu()).reshape(())
    return {name: t.contiguous() for name, t in out.items()}


def _check_nvfp4_student(student: nn.Module) -> dict[str, QuantLinear]:
    layers = quant_linears(student)
    if not layers:
        raise ExportError("the model has no quantized Linear layers: export a student made by build_student")
    other = sorted({m.format_name for m in layers.values()} - {"nvfp4"})
    if other:
        raise ExportError(f"only NVFP4 students can be exported to NVFP4 layouts; this student is {other[0]}")
    if len({m.quantize_input for m in layers.values()}) > 1:
        raise ExportError("the student mixes W4A4 and W4A16 layers; an export holds one scheme")
    return layers


def _layer_amaxes(name: str, m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight global amax, input amax or None), checked to be finite and positive."""
    weight_amax = m.weight_global_amax().detach().float().cpu()
    input_amax = m.input_amax.detach().float().cpu() if m.quantize_input else None
    for what, amax, hint in (("weight global", weight_amax, "frozen weight scales never calibrated?"),
                             ("input", input_amax, "W4A4 student not calibrated: run calibrate()")):
        if amax is not None and not (torch.isfinite(amax) and amax > 0):
            raise ExportError(f"{name}: {what} amax is {amax.item()} ({hint}); "
                              "an NVFP4 checkpoint needs a finite positive global scale")
    return weight_amax, input_amax


def _tied_output_name(model: nn.Module) -> str | None:
    """State-dict key of the output embedding when it is tied to the input embedding (not written)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out_emb, in_emb = (get_out() if get_out else None), (get_in() if get_in else None)
    if out_emb is None or in_emb is None:
        return None
    name = next(n for n, mod in model.named_modules() if mod is out_emb)
    if isinstance(out_emb, QuantLinear):
        raise ExportError(f"{name} is tied to the input embeddings and cannot be quantized; exclude it")
    if out_emb.weight is not in_emb.weight:
        raise ExportError(f"config.tie_word_embeddings is true but {name}.weight differs from the input "
                          "embeddings; untie them in the config or tie the weights")
    return f"{name}.weight"


def compress_state_dict(student: nn.Module, layout: str | Layout) -> dict[str, torch.Tensor]:
    """The export's tensors, name -> CPU tensor, in module order. Pure: the student is not modified.

    Quantized Linear layers become the layout's packed codes and scales (see the module docstring); every
    other floating-point tensor is copied in bfloat16, integer buffers as they are. A tied output
    embedding is left out.
    """
    layout = get_layout(layout)
    layers = _check_nvfp4_student(student)
    owned = {f"{name}.{local}": name for name in layers for local in _MODULE_TENSORS}
    skip = _tied_output_name(student)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in student.state_dict(keep_vars=True).items():
        if key in owned:
            name = owned[key]
            if key == f"{name}.weight":
                m = layers[name]
                weight_amax, input_amax = _layer_amaxes(name, m)
                for local, t in compress_linear(m.weight, weight_amax, input_amax, layout).items():
                    out[f"{name}.{local}"] = t
                if m.bias is not None:
                    out[f"{name}.bias"] = m.bias.detach().to("cpu", DENSE_DTYPE, copy=True)
            continue
        if key == skip or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        dtype = DENSE_DTYPE if tensor.is_floating_point() else tensor.dtype
        out[key] = tensor.detach().to("cpu", dtype, copy=True).contiguous()
    return out


# ------------------------------------------------------------------------------------------- configs


def unquantized_linears(student: nn.Module) -> list[str]:
    """Names of the Linear layers left in high precision (the `ignore` / `exclude_modules` list)."""
    return [name for name, m in student.named_modules() if isinstance(m, nn.Linear)]


def compressed_tensors_config(w4a4: bool, ignore: list[str]) -> dict:
    """config.json `quantization_config`, built and validated by compressed-tensors' own pydantic models and
    serialised the way its `ModelCompressor.update_config` writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    scheme = preset_name_to_scheme("NVFP4" if w4a4 else "NVFP4A16", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=CT_FORMAT,
                                quantization_status=QuantizationStatus.COMPRESSED, ignore=list(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"})}


def modelopt_hf_quant_config(w4a4: bool, ignore: list[str]) -> dict:
    """hf_quant_config.json as ModelOpt writes it (METHOD.md §3)."""
    return {"producer": {"name": "ckaqad", "version": __version__},
            "quantization": {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
                             "group_size": nvfp4.BLOCK_SIZE, "exclude_modules": list(ignore)}}


def modelopt_config(hf_quant_config: dict) -> dict:
    """config.json `quantization_config` for the modelopt layout, as ModelOpt's
    `convert_hf_quant_config_format` writes it (quant_method "modelopt"). ModelOpt writes no input group
    for W4A16_NVFP4; here the weights-only group is written so that the config says what the tensors hold.
    """
    quant = hf_quant_config["quantization"]
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant["group_size"]}
    group = {"weights": dict(args), "targets": ["Linear"]}
    if quant["quant_algo"] == "NVFP4":
        group["input_activations"] = dict(args)
    return {"config_groups": {"group_0": group}, "ignore": list(quant["exclude_modules"]),
            "quant_algo": quant["quant_algo"], "producer": dict(hf_quant_config["producer"]),
            "quant_method": "modelopt"}


def _model_config(student: nn.Module, quantization_config: dict) -> dict:
    config = getattr(student, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError("the student has no Hugging Face config (model.config); export needs one")
    data = config.to_dict()
    data.pop("quantization_config", None)
    if not data.get("architectures"):
        data["architectures"] = [type(student).__name__]
    data["dtype"] = data["torch_dtype"] = "bfloat16"
    data["quantization_config"] = quantization_config
    return data


# ------------------------------------------------------------------------------------------- summary


@dataclass
class ExportSummary:
    """Sizes of an export. `files` maps every file but export_summary.json itself to its size in bytes;
    `bits_per_quantized_param` counts packed codes, FP8 block scales and FP32 global scales of the quantized
    layers (about 4.5); `bf16_bytes` is 2 bytes per parameter of the whole model, `size_vs_bf16` the
    safetensors bytes over that."""

    layout: str
    scheme: str
    out_dir: str
    files: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0
    tensor_bytes: int = 0
    quantized_layers: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    bits_per_quantized_param: float = 0.0
    total_params: int = 0
    bf16_bytes: int = 0
    size_vs_bf16: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        mib = 1024 ** 2
        rows = [
            ("layout", f"{self.layout} ({self.scheme})"),
            ("out dir", self.out_dir),
            ("quantized Linear layers", f"{self.quantized_layers} ({self.quantized_params:,} params)"),
            ("bits / quantized param",
             f"{self.bits_per_quantized_param:.3f} (codes + FP8 block + FP32 global scales)"),
            ("tensors (safetensors)", f"{self.tensor_bytes:,} B ({self.tensor_bytes / mib:.2f} MiB)"),
            ("same model in bf16", f"{self.bf16_bytes:,} B ({self.total_params:,} params x 2 B)"),
            ("size vs bf16", f"{self.size_vs_bf16:.3f}"),
            ("all files", f"{self.total_bytes:,} B in {len(self.files)} files"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _summarize(student: nn.Module, layers: dict[str, QuantLinear], tensors: dict[str, torch.Tensor],
               layout: Layout, w4a4: bool, out_dir: Path, files: dict[str, int]) -> ExportSummary:
    quantized_params = sum(m.weight.numel() for m in layers.values())
    quantized_bytes = 0
    for key, t in tensors.items():
        module, _, local = key.rpartition(".")
        if module in layers and local in _LOCAL_NAMES[layout]:
            quantized_bytes += t.numel() * t.element_size()
    total_params = sum(p.numel() for p in student.parameters())  # parameters() skips tied duplicates
    tensor_bytes = sum(size for name, size in files.items() if name.endswith(".safetensors"))
    return ExportSummary(
        layout=layout.value, scheme="w4a4" if w4a4 else "w4a16", out_dir=str(out_dir), files=dict(files),
        total_bytes=sum(files.values()), tensor_bytes=tensor_bytes, quantized_layers=len(layers),
        quantized_params=quantized_params, quantized_bytes=quantized_bytes,
        bits_per_quantized_param=8 * quantized_bytes / max(quantized_params, 1), total_params=total_params,
        bf16_bytes=2 * total_params, size_vs_bf16=tensor_bytes / max(2 * total_params, 1))


# ------------------------------------------------------------------------------------------- writing


def _plan_shards(tensors: dict[str, torch.Tensor], shard_size_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `shard_size_bytes` (a bigger tensor goes alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_size_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, shard_size_bytes: int) -> None:
    shards = _plan_shards(tensors, shard_size_bytes)
    if len(shards) == 1:
        safetensors_torch.save_file(tensors, str(directory / SINGLE_SHARD), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors_torch.save_file({n: tensors[n] for n in names}, str(directory / filename),
                                    metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / SHARD_INDEX, index)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_generation_config(student: nn.Module, tokenizer, teacher_dir: Path | None,
                             directory: Path) -> None:
    generation_config = getattr(student, "generation_config", None)
    if generation_config is not None:
        generation_config.to_json_file(str(directory / GENERATION_CONFIG_FILE))
        return
    if teacher_dir is not None and (teacher_dir / GENERATION_CONFIG_FILE).is_file():
        shutil.copyfile(teacher_dir / GENERATION_CONFIG_FILE, directory / GENERATION_CONFIG_FILE)
        return
    from transformers import GenerationConfig

    ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).to_json_file(
        str(directory / GENERATION_CONFIG_FILE))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"export directory {out_dir} exists and is not a directory")
    if not overwrite:
        raise ExportError(f"export directory {out_dir} already exists (pass overwrite=True / --overwrite)")
    if any(out_dir.iterdir()) and not is_export_dir(out_dir):
        raise ExportError(f"{out_dir} exists and is not an export; refusing to replace it")


def export_student(student: nn.Module, tokenizer, out_dir: str | os.PathLike,
                   layout: str | Layout = "compressed-tensors", overwrite: bool = False,
                   teacher_dir: Path | None = None, shard_size_bytes: int = 2 * 1024 ** 3) -> ExportSummary:
    """Write `student` (an NVFP4 student from `build_student`, calibrated) as a deployable checkpoint.

    `out_dir` receives config.json, safetensors shards (`model.safetensors`, or `model-0000i-of-0000N`
    plus `model.safetensors.index.json`), the tokenizer, generation_config.json, `ckaqad_scales.json`,
    `export_summary.json` and, for `layout="modelopt"`, hf_quant_config.json. Everything is written to a
    temp dir beside `out_dir` and renamed into place at the end; on any error nothing is left behind, and
    with `overwrite` a previous export is replaced only once the new one is complete. `teacher_dir` (the
    teacher's HF directory) supplies the tokenizer when `tokenizer` is None and generation_config.json when
    the student has none. ExportError for anything the user can fix.
    """
    layout = get_layout(layout)
    out_dir = Path(out_dir).expanduser()
    if shard_size_bytes <= 0:
        raise ConfigError(f"shard size must be positive, got {shard_size_bytes} bytes")
    if teacher_dir is not None:
        teacher_dir = Path(teacher_dir).expanduser()
        if not teacher_dir.is_dir():
            raise ExportError(f"teacher directory {teacher_dir} does not exist")
    _check_out_dir(out_dir, overwrite)
    layers = _check_nvfp4_student(student)
    if tokenizer is None:
        if teacher_dir is None:
            raise ExportError("export needs a tokenizer (or teacher_dir to read it from)")
        tokenizer = _load_tokenizer(teacher_dir)
    w4a4 = next(iter(layers.values())).quantize_input
    ignore = unquantized_linears(student)
    tensors = compress_state_dict(student, layout)
    if layout is Layout.COMPRESSED_TENSORS:
        hf_quant_config, quantization_config = None, compressed_tensors_config(w4a4, ignore)
    else:
        hf_quant_config = modelopt_hf_quant_config(w4a4, ignore)
        quantization_config = modelopt_config(hf_quant_config)
    config = _model_config(student, quantization_config)
    scales = _scales_record(layers, layout, w4a4)
    try:
        with atomic_directory(out_dir, replace=overwrite) as tmp:
            _write_shards(tensors, tmp, shard_size_bytes)
            _write_json(tmp / CONFIG_FILE, config)
            if hf_quant_config is not None:
                _write_json(tmp / HF_QUANT_CONFIG_FILE, hf_quant_config)
            _write_json(tmp / SCALES_FILE, scales)
            _write_generation_config(student, tokenizer, teacher_dir, tmp)
            tokenizer.save_pretrained(str(tmp))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            summary = _summarize(student, layers, tensors, layout, w4a4, out_dir, files)
            _write_json(tmp / SUMMARY_FILE, summary.to_dict())
    except ConfigError as exc:  # atomic_directory: the target appeared while we were writing
        raise ExportError(str(exc)) from exc
    return summary


def _scales_record(layers: dict[str, QuantLinear], layout: Layout, w4a4: bool) -> dict:
    """Exact float32 amaxes (hex) so that `load` reproduces the student bit for bit (module docstring)."""
    weight, inputs = {}, {}
    for name, m in layers.items():
        weight_amax, input_amax = _layer_amaxes(name, m)
        weight[name] = float(weight_amax).hex()
        if input_amax is not None:
            inputs[name] = float(input_amax).hex()
    return {"producer": {"name": "ckaqad", "version": __version__}, "layout": layout.value,
            "scheme": "w4a4" if w4a4 else "w4a16", "weight_global_amax": weight, "input_amax": inputs}


# ------------------------------------------------------------------------------------------- reading


@dataclass
class _ExportInfo:
    layout: Layout
    w4a4: bool
    config: dict
    weight_files: list[Path]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return data


def _inspect_export(export_dir: Path) -> _ExportInfo:
    """Layout, scheme and weight files of an export directory; ExportError if it is not one."""
    if not export_dir.exists():
        raise ExportError(f"export directory {export_dir} does not exist")
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir} is not a directory")
    if not (export_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{export_dir} is not an NVFP4 export (no config.json)")
    config = _read_json(export_dir / CONFIG_FILE)
    qconfig = config.get("quantization_config")
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if (export_dir / HF_QUANT_CONFIG_FILE).is_file() or method == "modelopt":
        quant = _read_json(export_dir / HF_QUANT_CONFIG_FILE).get("quantization", {}) \
            if (export_dir / HF_QUANT_CONFIG_FILE).is_file() else qconfig
        algo = quant.get("quant_algo")
        if algo not in ("NVFP4", "W4A16_NVFP4"):
            raise ExportError(f"{export_dir}: ModelOpt quant_algo {algo!r} is not NVFP4 or W4A16_NVFP4")
        layout, w4a4 = Layout.MODELOPT, algo == "NVFP4"
    elif method == "compressed-tensors":
        if qconfig.get("format") != CT_FORMAT:
            raise ExportError(f"{export_dir}: compressed-tensors format {qconfig.get('format')!r} "
                              f"is not {CT_FORMAT}")
        groups = list((qconfig.get("config_groups") or {}).values())
        if len(groups) != 1 or not isinstance(groups[0], dict):
            raise ExportError(f"{export_dir}: expected one compressed-tensors config group, "
                              f"got {len(groups)}")
        layout, w4a4 = Layout.COMPRESSED_TENSORS, bool(groups[0].get("input_activations"))
    else:
        raise ExportError(f"{export_dir} is not an NVFP4 export (config.json has no compressed-tensors or "
                          "modelopt quantization_config)")
    if (export_dir / SHARD_INDEX).is_file():
        weight_map = _read_json(export_dir / SHARD_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{export_dir / SHARD_INDEX} has no weight_map")
        files = [export_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = [export_dir / SINGLE_SHARD]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ExportError(f"{export_dir} is incomplete: missing {', '.join(missing)}")
    return _ExportInfo(layout=layout, w4a4=w4a4, config=config, weight_files=files)


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding an NVFP4 export in either layout (config + weight files present)."""
    try:
        _inspect_export(Path(path).expanduser())
    except ExportError:
        return False
    return True


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(safetensors_torch.load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ExportError(f"cannot read {path}: {exc}") from exc
    return tensors


def _amax_from_global(g: torch.Tensor) -> torch.Tensor:
    """A float32 amax with `amax / 2688 == g` exactly (the nearest such to `g·2688`), from ModelOpt's g."""
    g = g.float().reshape(())
    guess = g * GLOBAL_RANGE
    candidates = [guess]
    for direction in (float("inf"), float("-inf")):
        c = guess
        for _ in range(4):
            c = torch.nextafter(c, torch.tensor(direction))
            candidates.append(c)
    for c in candidates:
        if torch.equal(nvfp4.global_scale_from_amax(c), g):
            return c
    return guess


def _amax_from_reciprocal(global_scale: torch.Tensor, exact_hex: str | None) -> torch.Tensor:
    """amax from compressed-tensors' `G = 2688/amax`: the recorded exact value when it maps to `G`, else
    `2688/G` (whose g may be one ulp off the student's; module docstring)."""
    global_scale = global_scale.float().reshape(())
    if exact_hex is not None:
        exact = torch.tensor(float.fromhex(exact_hex), dtype=torch.float32)
        if torch.equal(reciprocal_global_scale(exact), global_scale):
            return exact
    return torch.tensor(GLOBAL_RANGE, dtype=torch.float32) / global_scale


def _recover_amaxes(info: _ExportInfo, tensors: dict, name: str, scales: dict) -> tuple[torch.Tensor, ...]:
    _, _, global_name, input_name = _LOCAL_NAMES[info.layout]
    recorded_w = scales.get("weight_global_amax", {}).get(name)
    recorded_in = scales.get("input_amax", {}).get(name)
    if info.layout is Layout.MODELOPT:
        weight_amax = _amax_from_global(tensors[f"{name}.{global_name}"])
        input_amax = _amax_from_global(tensors[f"{name}.{input_name}"]) if info.w4a4 else None
    else:
        weight_amax = _amax_from_reciprocal(tensors[f"{name}.{global_name}"], recorded_w)
        input_amax = (_amax_from_reciprocal(tensors[f"{name}.{input_name}"], recorded_in)
                      if info.w4a4 else None)
    return weight_amax, input_amax


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise ExportError(f"cannot load the tokenizer in {directory}: {exc}") from exc


def _build_model(export_dir: Path, config_dict: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ExportError(f"{export_dir / CONFIG_FILE} has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # unknown architectures, bad configs
        raise ExportError(f"cannot build the model described by {export_dir / CONFIG_FILE}: {exc}") from exc


@torch.no_grad()
def load(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Read an export (either layout) back as a fake-quantized float32 student in eval mode, with its
    tokenizer.

    Quantized layers get weight = the dequantized codes (`code · s8 · g`, exactly the student's quantized
    weight) and frozen global amaxes; re-quantizing that weight in the forward returns the same codes and
    scales, so the logits equal the exported student's (bit for bit with `ckaqad_scales.json`, see the
    module docstring; unquantized tensors are the bfloat16 values that were written). Gradients are off.
    """
    export_dir = Path(export_dir).expanduser()
    info = _inspect_export(export_dir)
    tensors = _read_tensors(info.weight_files)
    scales = _read_json(export_dir / SCALES_FILE) if (export_dir / SCALES_FILE).is_file() else {}
    packed_name = _LOCAL_NAMES[info.layout][1]  # block scales exist only for quantized layers
    quantized = sorted(key.rpartition(".")[0] for key, t in tensors.items()
                       if key.endswith(f".{packed_name}") and t.dtype == torch.float8_e4m3fn)
    model = _build_model(export_dir, info.config)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = sorted(set(quantized) - set(linears))
    if unknown:
        raise ExportError(f"{export_dir}: quantized tensors for modules the model does not have: "
                          f"{unknown[:3]}")
    config = QuantConfig(format="nvfp4", scheme="w4a4" if info.w4a4 else "w4a16", weight_global="frozen",
                         exclude=tuple(sorted(set(linears) - set(quantized))))
    quantize_model_(model, config)
    layers = quant_linears(model)
    if sorted(layers) != quantized:
        raise ExportError(f"{export_dir}: the quantized layers in the checkpoint do not match the model")
    used = _load_quantized(info, tensors, layers, scales, export_dir)
    used |= _load_dense(model, tensors, layers, export_dir)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ExportError(f"{export_dir}: tensors that the model does not use: {extra[:5]}")
    tokenizer = _load_tokenizer(export_dir)
    model.to(torch.device(device)).eval().requires_grad_(False)
    return model, tokenizer


def _load_quantized(info: _ExportInfo, tensors: dict, layers: dict[str, QuantLinear], scales: dict,
                    export_dir: Path) -> set[str]:
    packed_name, scale_name, global_name, input_name = _LOCAL_NAMES[info.layout]
    used: set[str] = set()
    changed = []
    for name, m in layers.items():
        keys = [f"{name}.{packed_name}", f"{name}.{scale_name}", f"{name}.{global_name}"]
        keys += [f"{name}.{input_name}"] if info.w4a4 else []
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ExportError(f"{export_dir}: missing tensors {missing}")
        packed, block_scales = tensors[keys[0]], tensors[keys[1]]
        if tuple(packed.shape) != (m.out_features, m.in_features // 2) or packed.dtype != torch.uint8 \
                or tuple(block_scales.shape) != (m.out_features, m.in_features // nvfp4.BLOCK_SIZE):
            raise ExportError(f"{export_dir}: {name} has packed {tuple(packed.shape)} {packed.dtype} and "
                              f"scales {tuple(block_scales.shape)} for a [{m.out_features}, "
                              f"{m.in_features}] Linear")
        weight_amax, input_amax = _recover_amaxes(info, tensors, name, scales)
        codes = nvfp4.unpack(packed)
        g = nvfp4.global_scale_from_amax(weight_amax)
        weight = nvfp4.NVFP4Tensor(codes, block_scales, g).dequantize()
        m.weight.copy_(weight)
        m.weight_amax.copy_(weight_amax)
        if input_amax is not None:
            m.input_amax.copy_(input_amax)
        # Re-quantizing the dequantized weight must give back the stored codes and scales; it can fail only
        # for blocks whose FP8 scale is subnormal and whose largest code is below 6.
        again = nvfp4.quantize(weight, weight_amax)
        if not (torch.equal(again.codes, codes)
                and torch.equal(again.block_scales.view(torch.uint8), block_scales.view(torch.uint8))):
            changed.append(name)
        if m.bias is not None:
            if f"{name}.bias" not in tensors:
                raise ExportError(f"{export_dir}: missing tensor {name}.bias")
            m.bias.copy_(tensors[f"{name}.bias"].float())
            keys.append(f"{name}.bias")
        used.update(keys)
    if changed:
        warnings.warn(f"{len(changed)} layers re-quantize to different codes than stored (blocks with "
                      f"subnormal FP8 scales), first {changed[0]}; their forward differs from the export",
                      stacklevel=3)
    return used


def _load_dense(model: nn.Module, tensors: dict, layers: dict[str, QuantLinear],
                export_dir: Path) -> set[str]:
    owned = {f"{name}.{local}" for name in layers for local in _MODULE_TENSORS}
    skip = _tied_output_name(model)
    used: set[str] = set()
    for key, target in model.state_dict(keep_vars=True).items():
        if key in owned or key == skip:
            continue
        if key not in tensors:
            raise ExportError(f"{export_dir}: missing tensor {key}")
        source = tensors[key]
        if tuple(source.shape) != tuple(target.shape):
            raise ExportError(f"{export_dir}: {key} has shape {tuple(source.shape)}, the model expects "
                              f"{tuple(target.shape)}")
        target.data.copy_(source.to(target.dtype))
        used.add(key)
    return used


# ------------------------------------------------------------------------------------------------- CLI


def verify_export(export_dir: str | os.PathLike, student: nn.Module) -> dict:
    """Read an export back the way serving stacks do and compare it with the student it was written from.

    For every quantized layer: the codes (through compressed-tensors' own FP4 unpacker) and FP8 block scales
    must equal those of the student's weights, and the weight compressed-tensors' `NVFP4PackedCompressor`
    (what transformers and llm-compressor call) decompresses must be within one ulp of its dtype of the
    student's fake-quantized weight (the ModelOpt layout: `code · s8 · g` computed here, which must be exact).
    Then `load` must give back the student's quantized weights bit for bit. Returns the counts and worst
    differences; ExportError if any check fails.
    """
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor, unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig

    export_dir = Path(export_dir).expanduser()
    info = _inspect_export(export_dir)
    tensors = _read_tensors(info.weight_files)
    layers = _check_nvfp4_student(student)
    packed_name, scale_name, global_name, _ = _LOCAL_NAMES[info.layout]
    scheme = None
    if info.layout is Layout.COMPRESSED_TENSORS:
        scheme = QuantizationConfig.model_validate(info.config["quantization_config"]).config_groups["group_0"]
    grid = nvfp4.e2m1_grid()
    worst_rel, failures, reader_dtype = 0.0, [], ""
    for name, m in layers.items():
        local = {k: tensors[f"{name}.{k}"] for k in (packed_name, scale_name, global_name)}
        want = nvfp4.quantize(m.weight.detach().float().cpu(), m.weight_global_amax().cpu())
        values = unpack_fp4_from_uint8(local[packed_name], m.out_features, m.in_features, dtype=torch.float32)
        if not torch.equal(values, grid[want.codes.long()]):
            failures.append(f"{name}: codes differ")
        if not torch.equal(local[scale_name].view(torch.uint8), want.block_scales.view(torch.uint8)):
            failures.append(f"{name}: block scales differ")
        student_weight = m.quantized_weight().detach().float().cpu()
        if scheme is not None:
            dense = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
            reader_dtype = str(dense.dtype).removeprefix("torch.")
            reference = student_weight.to(dense.dtype)
            one_ulp = (torch.nextafter(dense, reference) == reference) | (dense == reference)
            if not bool(one_ulp.all()):
                failures.append(f"{name}: compressed-tensors dequantizes beyond one {dense.dtype} ulp")
        else:
            scales = local[scale_name].float().repeat_interleave(16, dim=-1)
            dense = grid[want.codes.long()] * (scales * local[global_name].float())
            if not torch.equal(dense, student_weight):
                failures.append(f"{name}: code · s8 · weight_scale_2 differs from the student's weight")
        nonzero = student_weight != 0
        rel = (dense.float() - student_weight).abs()[nonzero] / student_weight.abs()[nonzero]
        worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
    reloaded, _ = load(export_dir)
    reloaded_layers = quant_linears(reloaded)
    exact = sum(torch.equal(reloaded_layers[n].quantized_weight().cpu(), m.quantized_weight().detach().float().cpu())
                for n, m in layers.items())
    if exact != len(layers):
        failures.append(f"load: {len(layers) - exact} layers' quantized weights differ from the student's")
    if failures:
        raise ExportError(f"{export_dir} does not match the student: {'; '.join(failures[:3])}")
    return {"layers": len(layers), "codes_and_block_scales_equal": len(layers),
            "reader": "compressed-tensors NVFP4PackedCompressor" if scheme is not None else "code * s8 * g",
            "reader_agreement": f"within one {reader_dtype} ulp" if scheme is not None else "exact",
            "max_relative_weight_difference": worst_rel, "load_bit_exact_layers": exact}


@dataclass
class ExportConfig:
    run: str | None = None
    """a distillation run directory (its final student, else its newest checkpoint)"""
    student: str | None = None
    """a student directory (or any run/student directory) instead of --run"""
    teacher: str | None = None
    """teacher the student was built from (default: the run's teacher, else the embedded model)"""
    format: str = "nvfp4"
    """PTQ format when exporting the teacher's PTQ student (--ptq)"""
    scheme: str = "w4a4"
    """PTQ scheme when exporting the teacher's PTQ student (--ptq)"""
    ptq: bool = False
    """export the calibrated PTQ student of --teacher (no training) instead of a run"""
    layout: str = "compressed-tensors"
    """compressed-tensors (vLLM) or modelopt (TensorRT-LLM)"""
    out: str = "exports/student"
    """export directory"""
    overwrite: bool = False
    """replace an existing export at --out"""
    shard_size_mb: int = 2048
    """largest safetensors shard in MiB"""
    verify: bool = True
    """read the export back (compressed-tensors' decompressor and ckaqad's loader) and compare with the student"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""

    def __post_init__(self) -> None:
        get_layout(self.layout)
        if self.ptq:
            QuantConfig(format=self.format, scheme=self.scheme)  # validates both names before any work
        sources = sum(bool(x) for x in (self.run, self.student, self.ptq))
        if sources != 1:
            raise ConfigError("give exactly one of --run DIR, --student DIR or --ptq")
        if self.shard_size_mb < 1:
            raise ConfigError(f"--shard-size-mb must be at least 1, got {self.shard_size_mb}")


def run_export(config: ExportConfig) -> ExportSummary:
    """`ckaqad export`: rebuild the student on its teacher's architecture and write the export."""
    from ckaqad.errors import CheckpointError
    from ckaqad.evaluate import run_teacher_spec
    from ckaqad.models import load_model
    from ckaqad.students import find_student_dir, load_student

    out_dir = Path(config.out).expanduser()
    _check_out_dir(out_dir, config.overwrite)
    check_writable(out_dir)  # before any work: a file in the way of a parent, or a read-only parent
    source = Path(config.run or config.student).expanduser() if not config.ptq else None
    if source is not None:
        if not source.is_dir():
            raise CheckpointError(f"{source} is not a directory")
        if find_student_dir(source) is None:
            raise CheckpointError(f"{source} has no student checkpoint (no student/ and no complete checkpoint)")
    teacher_spec = config.teacher or (run_teacher_spec(source) if source is not None else None) or "default"
    teacher = load_model(teacher_spec, device=config.device)
    if config.ptq:
        from ckaqad.data import DataConfig, eval_batches, load_blocks
        from ckaqad.quantize import build_student, calibrate

        quant = QuantConfig(format=config.format, scheme=config.scheme)
        student, _ = build_student(teacher.model, quant)
        blocks = load_blocks(DataConfig(), teacher.model, teacher.tokenizer)
        calibrate(student, eval_batches(blocks.train, 4, next(teacher.model.parameters()).device,
                                        limit=quant.calib_batches * 4))
    else:
        student, _, _ = load_student(source, teacher.model)
    summary = export_student(student, teacher.tokenizer, out_dir, config.layout, overwrite=config.overwrite,
                             teacher_dir=teacher.model_dir, shard_size_bytes=config.shard_size_mb * 2**20)
    print(summary.table())
    print(f"wrote {out_dir}")
    if config.verify:
        check = verify_export(out_dir, student)
        worst = check["max_relative_weight_difference"]
        print(f"verified {check['layers']} quantized layers: codes and FP8 block scales equal the student's; "
              f"{check['reader']} {check['reader_agreement']} (max relative difference {worst:.2e}); "
              f"ckaqad.export.load bit-exact on {check['load_bit_exact_layers']}/{check['layers']}")
    return summary


def cli_commands() -> dict:
    def _export(values: dict) -> int:
        from ckaqad.cli import build_config

        run_export(build_config(ExportConfig, values))
        return 0

    return {"export": ("write a deployable NVFP4 checkpoint (compressed-tensors for vLLM, modelopt for TensorRT-LLM)",
                       [(ExportConfig, ())], _export)}
