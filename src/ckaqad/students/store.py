"""Student directories: a student carries its own config, so it loads without rebuilding it from a teacher.

A student directory (`paths.StudentDir`) holds `model.safetensors` (the student's state dict, including
calibrated `input_amax` buffers), the HF `config.json` of its own architecture (its depth and width may
differ from the teacher's), tokenizer files, and `ckaqad_student.json`: `{"quant": QuantConfig fields or
null, "quantized": [module names], ...}`. Only the vocabulary has to match a teacher.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ckaqad.errors import CheckpointError
from ckaqad.models.arch import tied_output_name
from ckaqad.paths import StudentDir
from ckaqad.quant.apply import quant_config_of, quant_linears, quantize_model_
from ckaqad.quant.linear import QuantConfig


def state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied tensors stored once each (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for key in list(state):
        ptr = state[key].data_ptr()
        if ptr in seen and state[key].numel():
            state[key] = state[key].clone()
        seen[ptr] = key
    return state


def save_student_dir(student: nn.Module, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """Write a student directory at `path` (which must not be visible to readers yet: callers write into a
    temp dir and rename)."""
    directory = StudentDir(Path(path))
    directory.root.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_file(student), str(directory.weights), metadata={"format": "pt"})
    student.config.save_pretrained(directory.root)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory.root)
    config = quant_config_of(student)
    meta = {"quant": asdict(config) if config else None, "quantized": sorted(quant_linears(student)),
            **(extra or {})}
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
