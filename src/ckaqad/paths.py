"""Every file name of the directories ckaqad writes, in one place, and `detect(path)` to tell them apart.

    run/                         `ckaqad distill` (RunDir)
      config.yaml                the resolved config; the base of `--resume`
      quantization.json          what the student quantized (QuantReport)
      metrics.jsonl, tensorboard/, loss_curves.png, cka_drift.png, summary.json
      checkpoints/step-000050/   CheckpointDir: student/, optimizer.safetensors, rng.safetensors, state.json,
                                 COMPLETE (written last)
      student/                   StudentDir of the final student
    student/                     model.safetensors (or shards + index), config.json,
                                 tokenizer files, ckaqad_student.json
    export/                      ExportDir: config.json (quantization_config), model.safetensors or shards +
                                 model.safetensors.index.json, ckaqad_scales.json, export_summary.json,
                                 generation_config.json, hf_quant_config.json (modelopt layout)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ckaqad.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
CONFIG_JSON = "config.json"


@dataclass(frozen=True)
class StudentDir:
    root: Path
    WEIGHTS = "model.safetensors"
    SHARD_INDEX = "model.safetensors.index.json"  # weights in several files (`export.shards`), as an export's
    META = "ckaqad_student.json"

    @property
    def weights(self) -> Path:
        return self.root / self.WEIGHTS

    @property
    def shard_index(self) -> Path:
        return self.root / self.SHARD_INDEX

    @property
    def meta(self) -> Path:
        return self.root / self.META

    @property
    def config(self) -> Path:
        return self.root / CONFIG_JSON

    def exists(self) -> bool:
        return self.meta.is_file() and (self.weights.is_file() or self.shard_index.is_file())


@dataclass(frozen=True)
class CheckpointDir:
    root: Path
    OPTIMIZER = "optimizer.safetensors"
    RNG = "rng.safetensors"
    STATE = "state.json"

    @staticmethod
    def name_for(step: int) -> str:
        return f"step-{step:06d}"

    @property
    def step(self) -> int:
        return int(self.root.name.split("-")[1])

    @property
    def student(self) -> StudentDir:
        return StudentDir(self.root / "student")

    @property
    def optimizer(self) -> Path:
        return self.root / self.OPTIMIZER

    @property
    def rng(self) -> Path:
        return self.root / self.RNG

    @property
    def state(self) -> Path:
        return self.root / self.STATE

    @property
    def marker(self) -> Path:
        return self.root / COMPLETE_MARKER

    def complete(self) -> bool:
        return self.marker.exists()


@dataclass(frozen=True)
class RunDir:
    root: Path
    CONFIG = "config.yaml"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def quantization(self) -> Path:
        return self.root / "quantization.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def loss_curves(self) -> Path:
        return self.root / "loss_curves.png"

    @property
    def cka_drift(self) -> Path:
        return self.root / "cka_drift.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def student(self) -> StudentDir:
        return StudentDir(self.root / "student")

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / CheckpointDir.name_for(step))

    def complete_checkpoints(self) -> list[CheckpointDir]:
        """Complete `step-N` checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [CheckpointDir(p) for p in self.checkpoints.glob("step-*") if (p / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> CheckpointDir | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def stale_temp_dirs(self) -> list[Path]:
        """Temp dirs left by a checkpoint writer that was killed."""
        return list(self.checkpoints.glob(".step-*.tmp-*")) if self.checkpoints.is_dir() else []

    def is_run(self) -> bool:
        return self.config.is_file()

    def final_or_latest_student(self) -> StudentDir | None:
        """The final student, else the student of the newest complete checkpoint."""
        if self.student.exists():
            return self.student
        latest = self.latest_checkpoint()
        return latest.student if latest is not None and latest.student.exists() else None


@dataclass(frozen=True)
class ExportDir:
    root: Path
    SINGLE_SHARD = "model.safetensors"
    SHARD_INDEX = "model.safetensors.index.json"
    HF_QUANT_CONFIG = "hf_quant_config.json"
    SCALES = "ckaqad_scales.json"
    SUMMARY = "export_summary.json"
    GENERATION_CONFIG = "generation_config.json"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_JSON

    @property
    def single_shard(self) -> Path:
        return self.root / self.SINGLE_SHARD

    @property
    def shard_index(self) -> Path:
        return self.root / self.SHARD_INDEX

    @property
    def hf_quant_config(self) -> Path:
        return self.root / self.HF_QUANT_CONFIG

    @property
    def scales(self) -> Path:
        return self.root / self.SCALES

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def generation_config(self) -> Path:
        return self.root / self.GENERATION_CONFIG

    def looks_like_export(self) -> bool:
        """config.json with a compressed-tensors or modelopt quantization_config, or hf_quant_config.json
        (the full check, with its reasons, is `export.reader.inspect_export`)."""
        if self.hf_quant_config.is_file():
            return True
        try:
            config = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        quant = config.get("quantization_config") if isinstance(config, dict) else None
        return isinstance(quant, dict) and quant.get("quant_method") in ("compressed-tensors", "modelopt")


# What a directory holds, as `detect` names it.
KINDS = ("export", "student", "run", "model", "missing", "other")


def detect(path: str | Path) -> str:
    """`export`, `student`, `run` (a distill run directory), `model` (an HF model directory), `missing` or
    `other`. A run whose training has not saved a student yet is still a `run`."""
    path = Path(path).expanduser()
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "other"
    if ExportDir(path).looks_like_export():
        return "export"
    if StudentDir(path).exists():
        return "student"
    if RunDir(path).is_run() or RunDir(path).latest_checkpoint() is not None:
        return "run"
    if (path / CONFIG_JSON).is_file():
        return "model"
    return "other"


def owning_run(path: str | Path) -> RunDir | None:
    """The run `path` belongs to: the run itself, its final student (`run/student`), a complete checkpoint or
    a complete checkpoint's student (`run/checkpoints/step-N/student`); None for a directory outside any run."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, *list(path.parents)[:3]):
        run = RunDir(candidate)
        if not run.is_run():
            continue
        members = {run.root, run.student.root}
        for checkpoint in run.complete_checkpoints():
            members |= {checkpoint.root, checkpoint.student.root}
        if path in members:
            return run
    return None


def run_teacher_spec(path: str | Path) -> str | None:
    """The teacher the run owning `path` was trained against (its config.yaml `teacher`), if any."""
    run = owning_run(path)
    if run is None:
        return None
    try:
        saved = yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {run.config}: {exc}") from exc
    return saved.get("teacher") if isinstance(saved, dict) else None


@dataclass(frozen=True)
class DamageDir:
    """`ckaqad damage --out`: an HF model directory (a student directory for `--kind nvfp4`) with its damage
    report; `ckaqad_sparsity.json` (the measured sparsity pattern) also sits in a recovered pruned student."""

    root: Path
    REPORT = "ckaqad_damage.json"
    REPORT_MD = "damage.md"
    SPARSITY = "ckaqad_sparsity.json"

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def report_md(self) -> Path:
        return self.root / self.REPORT_MD

    @property
    def sparsity(self) -> Path:
        return self.root / self.SPARSITY

    def exists(self) -> bool:
        return self.report.is_file()


@dataclass(frozen=True)
class RecoveryDir:
    """The recovery report of `ckaqad recover` (in its run directory) and of `ckaqad demo --recovery`."""

    root: Path
    JSON = "recovery.json"
    MD = "recovery.md"
    HTML = "recovery.html"
    HEATMAP = "recovery_cka.png"
    SCATTER = "recovery_scatter.png"

    @property
    def json(self) -> Path:
        return self.root / self.JSON

    @property
    def md(self) -> Path:
        return self.root / self.MD

    @property
    def html(self) -> Path:
        return self.root / self.HTML

    @property
    def heatmap(self) -> Path:
        return self.root / self.HEATMAP

    @property
    def scatter(self) -> Path:
        return self.root / self.SCATTER


@dataclass(frozen=True)
class StudyDir:
    """`ckaqad study`: one directory per cell under cells/ (a distill run, plus cell.json once evaluated), its
    export under exports/ when the study scores the served model, and the aggregate study.json / study.md /
    study.html with its plots."""

    root: Path
    JSON = "study.json"
    MD = "study.md"
    HTML = "study.html"
    CELL = "cell.json"
    LAYERS_PLOT = "study_cka_layers.png"

    @property
    def json(self) -> Path:
        return self.root / self.JSON

    @property
    def md(self) -> Path:
        return self.root / self.MD

    @property
    def html(self) -> Path:
        return self.root / self.HTML

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def exports(self) -> Path:
        """The compressed-tensors export of each served cell, at the cell's relative path (eval.runtimes)."""
        return self.root / "exports"

    @property
    def layers_plot(self) -> Path:
        return self.root / self.LAYERS_PLOT

    @staticmethod
    def metric_plot_name(metric: str) -> str:
        return "study_" + "".join(c if c.isalnum() else "_" for c in metric) + ".png"


@dataclass(frozen=True)
class RLRunDir(RunDir):
    """`ckaqad rl`: a RunDir (config.yaml, metrics.jsonl, tensorboard/, checkpoints/, summary.json) whose result
    is `model/`, an ordinary HF model directory (weights, config, tokenizer, ckaqad_rl.json) that any command
    takes as `--teacher RUN/model`, with the curves in rl_curves.png."""

    RL_META = "ckaqad_rl.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def curves(self) -> Path:
        return self.root / "rl_curves.png"


@dataclass(frozen=True)
class ShardedCheckpointDir:
    """A checkpoint written by the N processes of a torchrun job with torch.distributed.checkpoint (DCP), at
    the same `run/checkpoints/step-N/` place as a `CheckpointDir`:

        dcp/            the student's and optimizer's shards (`__R_0.distcp`, one per rank) and `.metadata`
        architecture/   config.json and ckaqad_student.json: the student directory without its weights
        rng.safetensors, state.json, COMPLETE (written last, by rank 0, after every rank has saved)

    DCP reshards on load, so it resumes at any number of processes (one plain process included)."""

    root: Path
    DCP = "dcp"
    ARCHITECTURE = "architecture"

    @property
    def dcp(self) -> Path:
        return self.root / self.DCP

    @property
    def architecture(self) -> StudentDir:
        return StudentDir(self.root / self.ARCHITECTURE)

    @property
    def rng(self) -> Path:
        return self.root / CheckpointDir.RNG

    @property
    def state(self) -> Path:
        return self.root / CheckpointDir.STATE

    @property
    def marker(self) -> Path:
        return self.root / COMPLETE_MARKER

    def is_sharded(self) -> bool:
        return (self.dcp / ".metadata").is_file()
