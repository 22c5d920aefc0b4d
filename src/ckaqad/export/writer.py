"""Writing a calibrated NVFP4 student as a deployable export directory (`export_student`): the compressed
tensors in safetensors shards, config.json with the layout's `quantization_config`, the layout's extra
files, the tokenizer, generation_config.json, `ckaqad_scales.json` and `export_summary.json`, built in a
temp dir and renamed into place (`files.atomic_directory`)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.capture import is_router
from ckaqad.errors import ConfigError, ExportError
from ckaqad.export.compress import (
    CheckpointNames,
    EntryCompressor,
    Scales,
    check_quantized_weights,
    scales_of,
    scales_record,
)
from ckaqad.export.layouts import Layout, get_layout
from ckaqad.export.reader import is_export_dir, load_tokenizer
from ckaqad.export.shards import DEFAULT_SHARD_SIZE_BYTES, ShardWriter
from ckaqad.files import atomic_directory, write_json
from ckaqad.paths import ExportDir
from ckaqad.quant.apply import freeze_scales
from ckaqad.quant.experts import QuantExperts


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
            ("quantized Linear layers", f"{self.quantized_layers} ({self.quantized_params:,} params; an expert's "
                                        "projection counts as one)"),
            ("bits / quantized param",
             f"{self.bits_per_quantized_param:.3f} (codes + FP8 block + FP32 global scales)"),
            ("tensors (safetensors)", f"{self.tensor_bytes:,} B ({self.tensor_bytes / mib:.2f} MiB)"),
            ("same model in bf16", f"{self.bf16_bytes:,} B ({self.total_params:,} params x 2 B)"),
            ("size vs bf16", f"{self.size_vs_bf16:.3f}"),
            ("all files", f"{self.total_bytes:,} B in {len(self.files)} files"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def summarize(state_dict: dict[str, torch.Tensor], scales: Scales, tensor_sizes: dict[str, int],
              layout: Layout, total_params: int, out_dir: Path, files: dict[str, int]) -> ExportSummary:
    """The `ExportSummary` of the compressed `state_dict` (`tensor_sizes`: export tensor name -> bytes) written
    as `files` (name -> bytes)."""
    quantized_params = sum(state_dict[f"{name}.weight"].numel() for name in scales.modules)
    quantized_params += sum(state_dict[f"{m}.{p}"].numel() for m in scales.experts
                            for p in scales.names.experts[m][0].fused)
    modules = {scales.names.module(name) for name in scales.modules} | set(scales.expert_projections())
    locals_ = set(layout.names.all())
    quantized_bytes = sum(size for key, size in tensor_sizes.items()
                          if key.rpartition(".")[0] in modules and key.rpartition(".")[2] in locals_)
    tensor_bytes = sum(size for name, size in files.items() if name.endswith(".safetensors"))
    return ExportSummary(
        layout=layout.name, scheme=scales.scheme, out_dir=str(out_dir), files=dict(files),
        total_bytes=sum(files.values()), tensor_bytes=tensor_bytes,
        quantized_layers=len(scales.modules) + len(scales.expert_projections()),
        quantized_params=quantized_params, quantized_bytes=quantized_bytes,
        bits_per_quantized_param=8 * quantized_bytes / max(quantized_params, 1), total_params=total_params,
        bf16_bytes=2 * total_params, size_vs_bf16=tensor_bytes / max(2 * total_params, 1))


def unquantized_linears(student: nn.Module, names: CheckpointNames | None = None) -> list[str]:
    """Checkpoint names of every module a serving engine reads as a Linear layer and that the export leaves in
    high precision (the `ignore` / `exclude_modules` list): unquantized nn.Linear layers, MoE routers (plain
    modules in transformers 5, Linear layers in vLLM and in the checkpoint) and the per-expert projections of
    unquantized experts. What the list does not name and the config's `Linear` target covers is quantized."""
    names = names or CheckpointNames()
    out = [names.module(name) for name, m in student.named_modules() if isinstance(m, nn.Linear)]
    out += [names.module(name) for name, m in student.named_modules() if is_router(m)]
    for name, (_, prefixes) in names.experts.items():
        if not isinstance(student.get_submodule(name), QuantExperts):
            out += list(prefixes.values())
    return out


def model_config(student: nn.Module, quantization_config: dict) -> dict:
    """config.json: the student's HF config in bfloat16 with the layout's `quantization_config`."""
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


def write_generation_config(student: nn.Module, tokenizer, teacher_dir: Path | None, directory: Path) -> None:
    """The student's generation config, else the teacher's file, else one from the tokenizer's special ids."""
    target = ExportDir(directory).generation_config
    generation_config = getattr(student, "generation_config", None)
    if generation_config is not None:
        generation_config.to_json_file(str(target))
        return
    if teacher_dir is not None and ExportDir(teacher_dir).generation_config.is_file():
        shutil.copyfile(ExportDir(teacher_dir).generation_config, target)
        return
    from transformers import GenerationConfig

    ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).to_json_file(str(target))


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """ExportError unless `out_dir` is absent, or an export (or empty directory) that `overwrite` may replace."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"export directory {out_dir} exists and is not a directory")
    if not overwrite:
        raise ExportError(f"export directory {out_dir} already exists (pass overwrite=True / --overwrite)")
    if any(out_dir.iterdir()) and not is_export_dir(out_dir):
        raise ExportError(f"{out_dir} exists and is not an export; refusing to replace it")


def write_compressed(state_dict: dict[str, torch.Tensor], scales: Scales, layout: Layout, directory: Path,
                     shard_size_bytes: int) -> dict[str, int]:
    """Compress `state_dict` entry by entry into safetensors shards in `directory` (`export.shards`); returns
    export tensor name -> bytes. Only the current shard's compressed tensors are held, never the whole
    compressed model; the files equal those of `write_shards(compress(state_dict, ...))` byte for byte."""
    compressor = EntryCompressor(scales, layout)
    writer = ShardWriter(directory, shard_size_bytes)
    for key, tensor in state_dict.items():
        writer.add(compressor(key, tensor))
    writer.close()
    return writer.sizes


def export_student(student: nn.Module, tokenizer, out_dir: str | os.PathLike,
                   layout: str | Layout = "compressed-tensors", overwrite: bool = False,
                   teacher_dir: str | os.PathLike | None = None,
                   shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES) -> ExportSummary:
    """Write `student` (a calibrated NVFP4 student from `build_ptq_student` or training) as a deployable
    checkpoint.

    `quant.apply.freeze_scales(student)` first writes the weight global amaxes the forward uses into the
    student's `weight_amax` buffers (its forward is unchanged); then `compress(student.state_dict(), ...)`.
    `out_dir` receives config.json, safetensors shards (`model.safetensors`, or `model-0000i-of-0000N`
    plus `model.safetensors.index.json`), the tokenizer, generation_config.json, `ckaqad_scales.json`,
    `export_summary.json` and, for `layout="modelopt"`, hf_quant_config.json. Everything is written to a
    temp dir beside `out_dir` and renamed into place at the end; on any error nothing is left behind, and
    with `overwrite` a previous export is replaced only once the new one is complete (a full disk raises
    DiskFullError). `teacher_dir` (the teacher's HF directory) supplies the tokenizer when `tokenizer` is
    None and generation_config.json when the student has none. ExportError for anything the user can fix.
    """
    layout = get_layout(layout)
    out_dir = Path(out_dir).expanduser()
    if shard_size_bytes <= 0:
        raise ConfigError(f"shard size must be positive, got {shard_size_bytes} bytes")
    if teacher_dir is not None:
        teacher_dir = Path(teacher_dir).expanduser()
        if not teacher_dir.is_dir():
            raise ExportError(f"teacher directory {teacher_dir} does not exist")
    check_out_dir(out_dir, overwrite)
    freeze_scales(student)
    scales = scales_of(student)
    if tokenizer is None:
        if teacher_dir is None:
            raise ExportError("export needs a tokenizer (or teacher_dir to read it from)")
        tokenizer = load_tokenizer(teacher_dir)
    state_dict = student.state_dict()
    check_quantized_weights(state_dict, scales)
    quantization_config, extra_files = layout.config_files(scales.w4a4, unquantized_linears(student, scales.names))
    config = model_config(student, quantization_config)
    total_params = sum(p.numel() for p in student.parameters())  # parameters() skips tied duplicates
    try:
        with atomic_directory(out_dir, replace=overwrite) as tmp:
            export = ExportDir(tmp)
            sizes = write_compressed(state_dict, scales, layout, tmp, shard_size_bytes)
            write_json(export.config, config, sort_keys=True)
            for name, data in extra_files.items():
                write_json(tmp / name, data, sort_keys=True)
            write_json(export.scales, scales_record(scales, layout), sort_keys=True)
            write_generation_config(student, tokenizer, teacher_dir, tmp)
            tokenizer.save_pretrained(str(tmp))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            summary = summarize(state_dict, scales, sizes, layout, total_params, out_dir, files)
            write_json(export.summary, summary.to_dict(), sort_keys=True)
    except ConfigError as exc:  # atomic_directory: the target appeared while we were writing
        raise ExportError(str(exc)) from exc
    return summary
