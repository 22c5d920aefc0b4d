"""Saving and finding trained students: a student directory, a run directory or an export directory.

A student directory holds `model.safetensors` (the fake-quant student's state dict, including calibrated
`input_amax` buffers), the HF `config.json`, tokenizer files and `ckaqad_student.json` (its QuantConfig).
A run directory (from `ckaqad distill`) holds one in `student/` once training ends, and checkpoints
`checkpoints/step-N/` that each contain one too.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ckaqad.errors import CheckpointError

STUDENT_META = "ckaqad_student.json"
WEIGHTS = "model.safetensors"


def save_student_dir(student: nn.Module, quant_config, path: Path, tokenizer=None, extra: dict | None = None) -> None:
    """Write a student directory at `path` (which must not be visible to readers yet: callers write into a
    temp dir and rename)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    # Tied embeddings appear twice in the state dict; safetensors refuses shared storage.
    seen: dict[int, str] = {}
    for key in list(state):
        ptr = state[key].data_ptr()
        if ptr in seen and state[key].numel():
            state[key] = state[key].clone()
        seen[ptr] = key
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    student.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    meta = {"quant": asdict(quant_config), **(extra or {})}
    (path / STUDENT_META).write_text(json.dumps(meta, indent=2))


def is_student_dir(path: Path) -> bool:
    return (path / STUDENT_META).is_file() and (path / WEIGHTS).is_file()


def check_compatible(student_config, teacher: nn.Module, where: Path) -> None:
    t = teacher.config
    for name in ("vocab_size", "num_hidden_layers", "hidden_size"):
        a, b = getattr(student_config, name, None), getattr(t, name, None)
        if a != b:
            raise CheckpointError(f"{where} does not match the teacher: {name} {a} vs teacher {b}")


def load_student_dir(path: Path, teacher: nn.Module) -> tuple[nn.Module, dict]:
    """Rebuild the fake-quant student from a student directory on the teacher's architecture."""
    from transformers import AutoConfig

    from ckaqad.quantize import QuantConfig, build_student

    meta = json.loads((path / STUDENT_META).read_text())
    check_compatible(AutoConfig.from_pretrained(path, local_files_only=True), teacher, path)
    config = QuantConfig(**{**meta["quant"], "exclude": tuple(meta["quant"]["exclude"])})
    student, _ = build_student(teacher, config)
    state = load_file(str(path / WEIGHTS), device=str(next(teacher.parameters()).device))
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the student (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    student.requires_grad_(False).eval()
    return student, meta


def find_student_dir(path: Path) -> Path | None:
    """The student directory inside a run (final, else the newest complete checkpoint), or `path` itself."""
    if is_student_dir(path):
        return path
    if is_student_dir(path / "student"):
        return path / "student"
    from ckaqad.checkpoint import latest_checkpoint

    step_dir = latest_checkpoint(path / "checkpoints")
    if step_dir is not None and is_student_dir(step_dir / "student"):
        return step_dir / "student"
    return None


def load_student(spec: str | Path, teacher: nn.Module) -> tuple[nn.Module, str, dict]:
    """(student, label, info) from a run, student or export directory."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"student path is not a directory: {spec}")
    from ckaqad import export

    if export.is_export_dir(path):
        model, _ = export.load(path, device=next(teacher.parameters()).device)
        check_compatible(model.config, teacher, path)
        return model, f"export:{path.name}", {"source": str(path), "kind": "export"}
    student_dir = find_student_dir(path)
    if student_dir is None:
        raise CheckpointError(f"{spec} is not a run, student or export directory (no {STUDENT_META}, "
                              "no checkpoints, no quantization_config)")
    student, meta = load_student_dir(student_dir, teacher)
    return student, meta.get("label", path.name), {"source": str(student_dir), "kind": "student", **meta}
