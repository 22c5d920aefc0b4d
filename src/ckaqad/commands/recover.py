"""`ckaqad recover`: self-distillation recovery of a damaged model — the original is the teacher, the damaged
model the student — on the same trainer as `ckaqad distill` (its `build_trainee` and `train`), KL, KL+CKA or
KL+CE (`--loss`).

The damage's constraint is kept while training: a pruned weight stays exactly zero (`damage.constraints`:
the mask is part of the student), a removed block stays removed (the student keeps its own depth; CKA pairs
each of its blocks with the teacher block it was, read from the damage report: `--layer-map auto`), a
quantized student stays quantized (it trains through its fake quantizer). For a forgetting, the narrow
corpus's held-out perplexity is tracked, and `--narrow-ce-weight` adds a CE term on it that keeps the new
skill.

The run directory is a distill run (config.yaml, metrics.jsonl with the damaged model's evaluation as step
0, checkpoints, student/) plus the recovery report (recovery.md/html/json, the layer × step CKA heatmap, the
recovery-vs-CKA scatter). The recovered student of an unquantized model is a dense HF directory (its zeros
kept, `ckaqad_sparsity.json` records the measured pattern); a quantized one is also exported in the
compressed-tensors NVFP4 layout (`ckaqad export`) to `RUN/export` unless `--no-export`.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckaqad.commands import damage, distill, export
from ckaqad.damage.constraints import SparsityMask, masks_from_zeros
from ckaqad.damage.forget import ForgetConfig, perplexity
from ckaqad.damage.narrow import NarrowCE
from ckaqad.damage.pruning import sparsity_pattern
from ckaqad.damage.recovery import teacher_reference
from ckaqad.data.blocks import DataConfig, TokenBlocks, build_blocks, eval_batches
from ckaqad.data.documents import load_documents
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.files import atomic_directory, write_json
from ckaqad.models.load import LoadedModel, load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.parallel.config import ParallelConfig
from ckaqad.paths import DamageDir, RecoveryDir, RunDir, detect
from ckaqad.quant.apply import quant_linears
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.plots import plot_run
from ckaqad.report.recovery import RecoveryRun, write_recovery_report
from ckaqad.students.store import save_student_dir
from ckaqad.train import trainer
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.metrics import MetricsLog, read_metrics
from ckaqad.train.trainer import TrainConfig

HELP = "recover a damaged model by self-distillation from the original (KL, KL+CKA, KL+CE), keeping its constraint"
MASK_MODES = ("auto", "none")


@dataclass
class Config:
    student: str | None = None
    """the damaged model: an HF model directory (ckaqad damage --out), a student, run or export directory"""
    teacher: str = "default"
    """the model before the damage: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF directory"""
    layers: str = "all"
    """student decoder blocks in the CKA term and the report: all, or a list like 0,4,8-11"""
    layer_map: str = "auto"
    """student->teacher blocks: auto (a depth-pruned student's kept blocks, else proportional) or pairs like 0:0,1:2"""
    keep_mask: str = "auto"
    """auto: pruned weights stay exactly zero (damage report's layers, else those >= 1% zeros); none: dense"""
    forget_data: str | None = None
    """narrow corpus whose held-out perplexity is tracked (default: the damage report's, for a forgetting)"""
    narrow_ce_weight: float = 0.0
    """weight of a CE term on the narrow corpus (keeps a forgetting's new skill); 0: none"""
    export: bool = True
    """export a quantized student in the compressed-tensors NVFP4 layout to RUN/export"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/recover"
    """run directory"""
    resume: str | None = None
    """continue the recovery run in this directory from its newest checkpoint"""
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(loss="kl"))
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # distill's remaining sections, so that a recovery run's config.yaml (a distill run's) reads back on --resume;
    # `quant` only matters for `--student ptq`, which recover does not use.
    quant: QuantConfig = field(default_factory=QuantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not self.student and not self.resume:
            raise ConfigError("--student DIR (the damaged model) is required")
        if self.keep_mask not in MASK_MODES:
            raise ConfigError(f"--keep-mask must be one of {', '.join(MASK_MODES)}, got {self.keep_mask!r}")
        if self.narrow_ce_weight < 0:
            raise ConfigError(f"--narrow-ce-weight must be non-negative, got {self.narrow_ce_weight}")
        if self.narrow_ce_weight > 0 and "ce" in self.objective.terms:
            raise ConfigError("--narrow-ce-weight is a CE term on the narrow corpus; drop ce from --loss "
                              "(and --ce-weight) when using it")


def read_damage_report(student: Path) -> dict:
    """The damage report of a `ckaqad damage` directory ({} for a model damaged elsewhere)."""
    report = DamageDir(student).report
    if not report.is_file():
        return {}
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {report}: {exc}") from exc


def resolve_layer_map(config: Config, damage: dict) -> str:
    if config.layer_map != "auto":
        return config.layer_map
    return damage.get("layer_map", "proportional")


def distill_config(config: Config, damage: dict, student: str) -> distill.Config:
    """The distill run this recovery is (one trainer, one config.yaml, one resume rule)."""
    return distill.Config(teacher=config.teacher, student=student, layers=config.layers,
                          layer_map=resolve_layer_map(config, damage), device=config.device, out=config.out,
                          resume=config.resume, train=config.train, objective=config.objective, quant=config.quant,
                          data=config.data, checkpoint=config.checkpoint, parallel=config.parallel)


def narrow_blocks(path: str, teacher: LoadedModel, data: DataConfig) -> TokenBlocks:
    docs = load_documents(path, teacher.tokenizer)
    return build_blocks(docs, teacher.tokenizer, data.seq_len, data.heldout_fraction, source=str(path))


def saved_recover_config(run_root: Path) -> dict:
    path = run_root / "recover_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--resume {run_root}: not a recovery run (cannot read {path.name}: {exc})") from exc


def run(config: Config, teacher_loaded: LoadedModel | None = None, label: str | None = None) -> RecoveryRun:
    """Check, build the trainee, keep the constraint, train, write the student, the report and the export."""
    started = time.perf_counter()
    if config.resume:
        saved = saved_recover_config(Path(config.resume).expanduser())
        student_spec = saved["student"]
    else:
        student_spec = config.student
        if detect(student_spec) == "missing":
            raise CheckpointError(f"--student {student_spec} does not exist")
    damage = read_damage_report(Path(student_spec).expanduser())
    dcfg = distill_config(config, damage, student_spec)
    distill.run_dir_of(dcfg)  # a bad --out or --resume fails before anything is loaded
    teacher = teacher_loaded or load_model(config.teacher, device=config.device)
    narrow_path = config.forget_data or damage.get("forget_data")
    if config.narrow_ce_weight > 0 and not narrow_path:
        raise ConfigError("--narrow-ce-weight needs a narrow corpus: --forget-data, or a forget damage report")
    narrow = narrow_blocks(narrow_path, teacher, config.data) if narrow_path else None
    trainee, quant_report = distill.build_trainee(dcfg, teacher)
    student = trainee.student
    mask = None
    if config.keep_mask == "auto":
        masks = masks_from_zeros(student, damage.get("masked_layers"))
        mask = SparsityMask(student, masks) if masks else None
    if narrow is not None and config.narrow_ce_weight > 0:
        trainee.objective = NarrowCE(trainee.objective, student, narrow.train, config.train.batch_size,
                                     config.narrow_ce_weight, config.train.seed,
                                     start=trainee.start_step * config.train.grad_accum)
    device = trainee.device
    fidelity = trainee.evaluate

    def evaluate() -> dict:
        row = fidelity()
        if narrow is not None:
            row["narrow_perplexity"] = perplexity(student, eval_batches(narrow.heldout, config.train.batch_size, device,
                                                                        limit=config.train.eval_blocks))
        if mask is not None:
            row["mask_violations"] = mask.violations()
        return row

    trainee.evaluate = evaluate
    run_dir = trainee.run
    if trainee.start_step == 0:
        distill.write_run_files(trainee, dcfg, quant_report)
        write_json(run_dir.root / "recover_config.json", {**asdict(config), "student": student_spec})
        # The damaged model's evaluation is step 0 of metrics.jsonl (MetricsLog keeps steps <= its start).
        log = MetricsLog(run_dir, 0)
        log.write({"kind": "eval", "step": 0, **trainer.evaluate(trainee)})
        log.close()
    reference = teacher_reference(
        None if narrow is None else perplexity(teacher.model, eval_batches(narrow.heldout, config.train.batch_size,
                                                                           device, limit=config.train.eval_blocks)))
    trainer.train(trainee)
    if mask is not None:
        violations = mask.violations()
        mask.remove()
        if violations:
            raise RuntimeError(f"{violations} pruned weights became non-zero during recovery")
    quantized = bool(quant_linears(student))
    with atomic_directory(run_dir.student.root) as tmp:
        save_student_dir(student, tmp, trainee.tokenizer,
                         extra={"label": run_dir.root.name, "step": config.train.steps, "teacher": config.teacher,
                                "damage": damage.get("kind")}, shard_size_bytes=config.checkpoint.shard_size_bytes)
        if mask is not None:
            write_json(DamageDir(tmp).sparsity, sparsity_pattern(student, mask.masks))
    plot_run(run_dir.root)
    _, rows = read_metrics(run_dir.root)
    recovery = RecoveryRun(label=label or run_dir.root.name, damage=damage.get("kind", "unknown"),
                           loss=config.objective.loss, run=str(run_dir.root), teacher=reference, rows=rows,
                           runtime_s=time.perf_counter() - started)
    write_recovery_report(RecoveryDir(run_dir.root), [recovery],
                          {"teacher": config.teacher, "student": student_spec, "data": trainee.blocks.describe(),
                           "steps": config.train.steps, "runtime_s": time.perf_counter() - started})
    summary = {"final": rows[-1], "steps": config.train.steps, "loss": config.objective.loss,
               "damage": damage.get("kind"), "runtime_s": time.perf_counter() - started}
    write_json(run_dir.summary, summary)
    if quantized and config.export:
        export.run(export.Config(run=str(run_dir.root), teacher=config.teacher, out=str(run_dir.root / "export"),
                                 device=config.device, data=config.data))
    if config.train.progress:
        final, start = rows[-1], rows[0]
        print(f"{config.objective.loss} recovery of {damage.get('kind', 'a damaged model')}: held-out KL "
              f"{start['kl_per_token']:.4f} -> {final['kl_per_token']:.4f}, ppl {start['perplexity']:.3f} -> "
              f"{final['perplexity']:.3f} (teacher {final['teacher_perplexity']:.3f}), mean CKA "
              f"{start['mean_cka']:.4f} -> {final['mean_cka']:.4f} -> {run_dir.root}")
    return recovery



# ------------------------------------------------------------------------------- a study of several kinds


def slug(name: str) -> str:
    """A directory name for a damage kind or a loss (`2:4` -> `2-4`, `kl+cka` -> `kl-cka`)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


@dataclass
class StudyPlan:
    """Every damage and recovery of a study, built (and so validated) before anything runs."""

    damages: dict[str, damage.Config]
    recoveries: dict[str, list[Config]]


def plan_study(out: Path, teacher_spec: str, kinds: list[str], losses: list[str], train: TrainConfig,
               data: DataConfig, forget: ForgetConfig, device: str | None,
               damage_options: dict[str, dict] | None = None) -> StudyPlan:
    """The damage config of every kind (`out/damaged/KIND`) and its recovery with every loss
    (`out/runs/KIND-LOSS`), all validated."""
    damages, recoveries = {}, {}
    for kind in kinds:
        target = out / "damaged" / slug(kind)
        damages[kind] = damage.Config(kind=kind, teacher=teacher_spec, out=str(target), data=data, device=device,
                                      eval_blocks=train.eval_blocks, batch_size=train.batch_size, seed=train.seed,
                                      forget=forget, **(damage_options or {}).get(kind, {}))
        recoveries[kind] = [Config(student=str(target), teacher=teacher_spec, device=device, export=False,
                                   out=str(out / "runs" / f"{slug(kind)}-{slug(loss)}"), train=train,
                                   objective=ObjectiveConfig(loss=loss), data=data,
                                   checkpoint=CheckpointConfig(save_every=train.steps, keep_last=1))
                            for loss in losses]
    return StudyPlan(damages, recoveries)


def run_study(plan: StudyPlan, teacher: LoadedModel, out: Path, meta: dict) -> tuple[list[RecoveryRun], dict]:
    """Damage, recover with every loss, and write one recovery report over all runs into `out`.

    The runs' checkpoints (optimizer state included, 3x the model) are removed once a run has finished:
    a study keeps its reports, metrics and final students, and is rerun rather than resumed."""
    started = time.perf_counter()
    runs: list[RecoveryRun] = []
    damages: dict[str, dict] = {}
    for kind, damage_config in plan.damages.items():
        print(f"== damage: {kind}")
        damages[kind] = damage.run(damage_config, teacher_loaded=teacher)
        for config in plan.recoveries[kind]:
            print(f"== recover {kind} with {config.objective.loss}")
            runs.append(run(config, teacher_loaded=teacher, label=f"{kind} {config.objective.loss}"))
            shutil.rmtree(RunDir(Path(config.out)).checkpoints, ignore_errors=True)
            # The trainee is a reference cycle (its evaluate callback closes over the student): free the last
            # run's student, gradients and optimizer before the next one is built.
            gc.collect()
    meta = {"data": next(iter(damages.values()))["data"], **meta, "runtime_s": time.perf_counter() - started,
            "damage_runtime_s": {k: d["runtime_s"] for k, d in damages.items()},
            "recovery_runtime_s": {r.label: r.runtime_s for r in runs}}
    write_recovery_report(RecoveryDir(out), runs, meta)
    return runs, damages
