"""Where a student comes from (`--student SPEC`), one kind per registered name.

- `ptq`: the teacher copied in float32, its Linear layers fake-quantized (`QuantConfig`) and calibrated on
  the first `calib_batches × calib_batch_size` training blocks — the one place a PTQ student is built;
  distill, diagnose, export and the demo all call `build_ptq_student`.
- a path (the `load` kind): an HF model directory (a pruned or fine-tuned model, loaded as it is), a
  student directory, a run (its final student, else its newest checkpoint) or an NVFP4 export; quantized or
  not, of its own depth and width. Only the vocabulary must match the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckaqad.data.blocks import TokenBlocks, eval_batches
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.export.reader import load_export
from ckaqad.models.load import load_model
from ckaqad.paths import RunDir, ShardedCheckpointDir, StudentDir, detect
from ckaqad.quant.apply import (
    QuantReport,
    calibrate,
    quant_config_of,
    quant_experts,
    quantize_model_,
    quantized_parameters,
)
from ckaqad.quant.linear import QuantConfig
from ckaqad.registry import Registry
from ckaqad.students.store import check_vocabulary, consolidate_sharded_checkpoint, load_student_dir

STUDENT_KINDS: Registry[str] = Registry("student kind", flag="--student")
STUDENT_KINDS.register("ptq", "the teacher's calibrated fake-quant copy (QuantConfig)")
STUDENT_KINDS.register("load", "an HF model, student, run or export directory")


def calibration_batches(blocks: TokenBlocks, quant: QuantConfig, device) -> Iterator[dict[str, torch.Tensor]]:
    """The calibration data of every PTQ student: the first `calib_batches` batches of `calib_batch_size`
    training blocks."""
    return eval_batches(blocks.train, quant.calib_batch_size, device,
                        limit=quant.calib_batches * quant.calib_batch_size)


def build_ptq_student(teacher: nn.Module, quant: QuantConfig, blocks: TokenBlocks | None
                      ) -> tuple[nn.Module, QuantReport]:
    """A float32 copy of `teacher` with fake-quantized Linear layers, calibrated on `blocks` (teacher
    untouched). Gradients are on and the model is in eval mode; W4A16 needs no data (`blocks` may be None).

    float32 master weights: QAD learning rates (1e-5..1e-6) vanish under bf16 rounding; the forward runs
    under autocast on GPU.
    """
    student, report = ptq_skeleton(teacher, quant)
    return calibrate_ptq_student(student, report, quant, blocks, next(teacher.parameters()).device), report


def ptq_skeleton(teacher: nn.Module, quant: QuantConfig) -> tuple[nn.Module, QuantReport]:
    """The PTQ student before calibration: a float32 copy of `teacher` with its Linear layers swapped for
    QuantLinear. A teacher on the meta device gives a student on the meta device (a sharded run fills it after
    `fully_shard`, parallel/loading.py), with its quantizer buffers on the host, zero."""
    student = copy.deepcopy(teacher).float()
    report = quantize_model_(student, quant)
    if not report.quantized:
        raise ConfigError(f"no Linear layer of this model can be quantized with {quant.format}: "
                          f"{next(iter(report.excluded.values()), 'none found')}")
    return student, report


def calibrate_ptq_student(student: nn.Module, report: QuantReport, quant: QuantConfig, blocks: TokenBlocks | None,
                          device: torch.device) -> nn.Module:
    """Calibrate a `ptq_skeleton` with weights (plain or sharded) on the first training blocks of `blocks`;
    record the tokens per expert in `report`; gradients on."""
    if quant.high_precision == "frozen":
        round_high_precision_(student)  # before calibration: the amaxes must see the served norms
    if quant.quantize_inputs:
        if blocks is None:
            raise ConfigError("a W4A4 student needs calibration data")
        calibrate(student, calibration_batches(blocks, quant, device))
    else:
        calibrate(student, iter(()))  # freezes weight amaxes where configured; no activations to observe
    report.calibration_tokens = {name: m.calib_tokens.tolist() for name, m in quant_experts(student).items()
                                 if quant.quantize_inputs}
    return make_trainable(student.train(False))


def high_precision_parameters(student: nn.Module) -> list[nn.Parameter]:
    """The float parameters of a quantized student other than its quantized weights: norms, embeddings (a tied
    head once), biases and unquantized Linear layers such as the head — what an export stores in bf16."""
    quantized = {id(p) for p in quantized_parameters(student)}
    return [p for p in student.parameters() if p.is_floating_point() and id(p) not in quantized]


@torch.no_grad()
def round_high_precision_(student: nn.Module) -> None:
    """Round the high-precision tensors to the bf16 values the export will hold (kept in their float32 dtype)."""
    for p in high_precision_parameters(student):
        p.copy_(p.to(torch.bfloat16))


def make_trainable(student: nn.Module) -> nn.Module:
    """Gradients on for what trains: every parameter, except that a quantized student with
    `high_precision="frozen"` keeps its high-precision tensors at their bf16 values, without gradients, so that
    the trained student is the served one (docs/method.md#high-precision-tensors)."""
    student.requires_grad_(True)
    quant = quant_config_of(student)
    if quant is not None and quant.high_precision == "frozen":
        round_high_precision_(student)
        for p in high_precision_parameters(student):
            p.requires_grad_(False)
    return student


def run_student_source(run: RunDir) -> StudentDir | ShardedCheckpointDir | None:
    """Where a run's student comes from: its final student, else its newest checkpoint's student, or that
    checkpoint itself when a torchrun job wrote it sharded (None: the run has no student yet)."""
    found = run.final_or_latest_student()
    latest = run.latest_checkpoint()
    if found is None and latest is not None and ShardedCheckpointDir(latest.root).is_sharded():
        return ShardedCheckpointDir(latest.root)
    return found


def run_student(run: RunDir) -> StudentDir | None:
    """The student directory of `run_student_source`; a sharded checkpoint is converted once, offline, into
    its student directory (`store.consolidate_sharded_checkpoint`)."""
    source = run_student_source(run)
    if isinstance(source, ShardedCheckpointDir):
        return consolidate_sharded_checkpoint(source.root)
    return source


@dataclass
class LoadedStudent:
    model: nn.Module
    label: str
    kind: str  # export | student | model
    source: Path
    meta: dict


def load_student(spec: str | Path, teacher: nn.Module | None = None,
                 device: torch.device | str | None = None) -> LoadedStudent:
    """A student from a path (the `load` kind), checked against `teacher`'s vocabulary when given."""
    path = Path(spec).expanduser()
    device = device if device is not None else (next(teacher.parameters()).device if teacher is not None else "cpu")
    kind = detect(path)
    if kind == "missing" or not path.is_dir():
        raise CheckpointError(f"student path is not a directory: {spec}")
    if kind == "export":
        model, _ = load_export(path, device=device)
        loaded = LoadedStudent(model, f"export:{path.name}", "export", path, {"source": str(path), "kind": "export"})
    elif kind in ("student", "run"):
        student_dir = StudentDir(path) if kind == "student" else run_student(RunDir(path))
        if student_dir is None:
            raise CheckpointError(f"{spec} has no student checkpoint (no student/ and no complete checkpoint)")
        model, meta = load_student_dir(student_dir.root, device)
        loaded = LoadedStudent(model, meta.get("label", path.name), "student", student_dir.root,
                               {"source": str(student_dir.root), "kind": "student", **meta})
    elif kind == "model":
        hf = load_model(path, device=device, dtype=torch.float32)
        loaded = LoadedStudent(hf.model, path.name, "model", path, {"source": str(path), "kind": "model"})
    else:
        raise CheckpointError(f"{spec} is not a run, student, export or HF model directory (no ckaqad_student.json, "
                              "no checkpoints, no config.json)")
    if teacher is not None:
        check_vocabulary(loaded.model, teacher, path)
    return loaded
