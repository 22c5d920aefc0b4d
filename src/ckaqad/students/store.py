"""Student directories: a student carries its own config, so it loads without rebuilding it from a teacher.

A student directory (`paths.StudentDir`) holds `model.safetensors` (the student's state dict, including
calibrated `input_amax` buffers), the HF `config.json` of its own architecture (its depth and width may
differ from the teacher's), tokenizer files, and `ckaqad_student.json`: `{"quant": QuantConfig fields or
null, "quantized": [module names], ...}`. Only the vocabulary has to match a teacher.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from ckaqad.errors import CheckpointError
from ckaqad.files import atomic_directory
from ckaqad.models.arch import tied_output_name
from ckaqad.paths import CheckpointDir, ShardedCheckpointDir, StudentDir
from ckaqad.quant.apply import quant_config_of, quant_modules, quantize_model_
from ckaqad.quant.linear import QuantConfig


def state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied tensors stored once each (safetensors refuses shared storage)."""
    return _untied_for_file(model.state_dict())


def save_student_dir(student: nn.Module, path: Path, tokenizer=None, extra: dict | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a student directory at `path` (which must not be visible to readers yet: callers write into a
    temp dir and rename). `state`: the weights to write instead of the student's own state dict (the full
    state dict a sharded student assembled on rank 0)."""
    directory = StudentDir(Path(path))
    save_architecture(student, directory.root, tokenizer, extra)
    weights = state_dict_for_file(student) if state is None else _untied_for_file(state)
    save_file(weights, str(directory.weights), metadata={"format": "pt"})


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


def _untied_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.detach().contiguous() for k, v in state.items()}
    seen: dict[int, str] = {}
    for key in list(out):
        ptr = out[key].data_ptr()
        if ptr in seen and out[key].numel():
            out[key] = out[key].clone()
        seen[ptr] = key
    return out


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
        weights = load_file(str(StudentDir(path).weights), device=str(device))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {StudentDir(path).weights}: {exc}") from exc
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
