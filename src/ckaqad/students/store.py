"""Student directories: a student carries its own config, so it loads without rebuilding it from a teacher.

A student directory (`paths.StudentDir`) holds `model.safetensors` (the student's state dict, including
calibrated `input_amax` buffers; a large one in shards with `model.safetensors.index.json`, `export.shards`),
the HF `config.json` of its own architecture (its depth and width may differ from the teacher's), tokenizer
files, and `ckaqad_student.json`: `{"quant": QuantConfig fields or null, "quantized": [module names], ...}`.
Only the vocabulary has to match a teacher.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from ckaqad.errors import CheckpointError
from ckaqad.export.shards import DEFAULT_SHARD_SIZE_BYTES, READ_ERRORS, ShardWriter, read_weights, weight_files
from ckaqad.files import atomic_directory
from ckaqad.models.arch import tied_output_name
from ckaqad.paths import CheckpointDir, ShardedCheckpointDir, StudentDir
from ckaqad.quant.apply import quant_config_of, quant_modules, quantize_model_
from ckaqad.quant.linear import QuantConfig


def save_student_dir(student: nn.Module, path: Path | None, tokenizer=None, extra: dict | None = None,
                     shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES) -> None:
    """Write a student directory at `path` (which must not be visible to readers yet: callers write into a
    temp dir and rename): its architecture and `write_student_weights`. A student sharded with FSDP2 is
    written by every rank together, each passing the same arguments but only rank 0 a `path` (None elsewhere)."""
    if path is not None:
        save_architecture(student, Path(path), tokenizer, extra)
    write_student_weights(student, None if path is None else StudentDir(Path(path)), shard_size_bytes)


def write_student_weights(student: nn.Module, directory: StudentDir | None,
                          shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES) -> None:
    """The student's state dict as safetensors files in `directory` (`model.safetensors`, or shards of at
    most `shard_size_bytes` plus `model.safetensors.index.json`; `export.shards`), one tensor at a time.

    A student sharded with FSDP2 (DTensor parameters) is streamed: every rank walks the state dict in the same
    order and gathers one parameter at a time (`DTensor.full_tensor()`, a collective, so every rank must call
    this; only the one given a `directory` keeps and writes the tensors). That rank holds at most one file's
    tensors plus one tensor, never the full state dict, and writes the same files, byte for byte, as one
    process writing the same weights. Names are the state dict's without activation-checkpoint wrappers."""
    writer = ShardWriter(directory.root, shard_size_bytes) if directory is not None else None
    seen: set[int] = set()
    for key, value in student.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if writer is None:
            continue
        tensor = value.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()  # a tied tensor: safetensors refuses shared storage
        seen.add(tensor.data_ptr())
        writer.add({key.replace(_CHECKPOINT_PREFIX, ""): tensor})
    if writer is not None:
        writer.close()


def read_student_weights(directory: StudentDir, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a student directory (one file, or the files its shard index names) on `device`.
    OSError, ValueError or SafetensorError for a missing or damaged file (the callers say what to do)."""
    return read_weights(weight_files(directory.root), device)


def save_architecture(student: nn.Module, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """A student directory without its weights: config.json, tokenizer files, ckaqad_student.json."""
    directory = StudentDir(Path(path))
    directory.root.mkdir(parents=True, exist_ok=True)
    student.config.save_pretrained(directory.root)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory.root)
    config = quant_config_of(student)
    # Module names as the state dict spells them (an activation-checkpoint wrapper is not part of the name).
    quantized = sorted(name.replace(_CHECKPOINT_PREFIX, "") for name in quant_modules(student))
    meta = {"quant": asdict(config) if config else None, "quantized": quantized, **(extra or {})}
    directory.meta.write_text(json.dumps(meta, indent=2))


def read_meta(path: Path) -> dict:
    try:
        return json.loads(StudentDir(path).meta.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {StudentDir(path).meta}: {exc}") from exc


def build_from_meta(path: Path, meta: dict) -> nn.Module:
    """The student's architecture (float32, from its own config.json) with its quantized layers in place."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for bad configs
        raise CheckpointError(f"cannot build the student described by {path / 'config.json'}: {exc}") from exc
    if meta.get("quant"):
        quant = QuantConfig(**{**meta["quant"], "exclude": tuple(meta["quant"]["exclude"])})
        # Older student directories list no module names: their exclusion patterns rebuild the same layers.
        quantize_model_(model, quant, only=meta.get("quantized"))
    return model


def check_weights_fit(model: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """CheckpointError unless `weights` fit the model's state dict exactly (a tied output embedding may be
    absent)."""
    own = model.state_dict()
    tied = tied_output_name(model)
    missing = [k for k in own if k not in weights and k != tied]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in weights
             if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: weights do not fit the student (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, shape {wrong[:3]})")


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load a state dict that must fit the model exactly (checked first; the model is untouched on error)."""
    check_weights_fit(model, weights, where)
    model.load_state_dict(weights, strict=False)


def load_student_dir(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(student in eval mode with gradients off, its meta) from a student directory, on `device`."""
    path = Path(path)
    meta = read_meta(path)
    model = build_from_meta(path, meta)
    try:
        weights = read_student_weights(StudentDir(path), device)
    except READ_ERRORS as exc:
        raise CheckpointError(f"cannot read the weights of {path}: {exc}") from exc
    model.to(device)
    load_weights(model, weights, path)
    model.requires_grad_(False).eval()
    return model, meta


def check_vocabulary(student: nn.Module, teacher: nn.Module, where: str | Path) -> None:
    """Distillation compares logits token for token: the vocabularies must be the same size."""
    a = getattr(student.config, "vocab_size", None)
    b = getattr(teacher.config, "vocab_size", None)
    if a != b:
        raise CheckpointError(f"{where} has a vocabulary of {a} tokens, the teacher {b}: distillation needs the "
                              "same tokenizer")


def consolidate_sharded_checkpoint(checkpoint: Path) -> StudentDir:
    """Give a sharded (torch.distributed.checkpoint) checkpoint its full student directory, offline and in one
    process: the architecture it saved is rebuilt on the CPU, DCP reads every rank's shards of the student into
    it (resharding to one process is DCP's own conversion; the optimizer shards are not read), and
    `checkpoint/student/` is written as a one-process checkpoint's student is. Diagnose, eval and export then
    read the checkpoint like any other. Returns the student directory (already there: returned as it is)."""
    sharded = ShardedCheckpointDir(Path(checkpoint))
    target = CheckpointDir(sharded.root).student
    if target.exists():
        return target
    if not sharded.is_sharded() or not sharded.marker.exists():
        raise CheckpointError(f"{sharded.root} is not a complete sharded checkpoint (no {sharded.DCP}/.metadata "
                              "or COMPLETE)")
    meta = read_meta(sharded.architecture.root)
    model = build_from_meta(sharded.architecture.root, meta)
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # one process reading N ranks' shards is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=str(sharded.dcp))
    except (OSError, ValueError, RuntimeError, dcp.CheckpointException) as exc:
        raise CheckpointError(f"cannot read the shards of {sharded.dcp}: {type(exc).__name__}") from exc
    model.load_state_dict(state)
    extra = {k: v for k, v in meta.items() if k not in ("quant", "quantized")}
    with atomic_directory(target.root) as tmp:
        save_student_dir(model, tmp, extra=extra)
    return target
