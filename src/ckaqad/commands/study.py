"""`ckaqad study CONFIG.yaml`: a grid of runs — models × formats × schemes × methods × seeds × budgets — each
cell a normal run directory under `OUT/cells/`, and one aggregate (`study.json`, `study.md`, `study.html`,
plots) with mean ± std and 95% intervals over seeds and the paired per-seed CKA-QAD − KL-QAD differences.

Resumable: a cell whose `cell.json` is there (with the same settings) is skipped; a distill run that stopped
is resumed from its newest checkpoint. Per model the teacher is loaded once, its task accuracies computed
once (the teacher cell), and the fidelity pass runs the teacher once per batch for up to `eval.group` students
together. `ptq` cells are deterministic (calibration on fixed blocks), so they are one cell per model and
format, without seed or budget. The YAML (every key but `models` optional):

    name: nvfp4-smollm2           # title of the report
    out: runs/study               # study directory (the --out flag wins)
    models: [default]             # teachers: default, gemma3-270m, a .gguf file or an HF directory
    formats: [nvfp4]
    schemes: [w4a4]
    methods: [ptq, kl, kl+cka]    # ptq, or a distill objective (terms joined by +: kl, cka, ce)
    seeds: [0, 1, 2]
    budgets: [20]                 # optimizer steps
    pairs: [[kl+cka, kl]]         # paired differences reported, a − b (default: this one when both are run)
    train: {batch_size: 4, lr: 5.0e-5, cka_tokens: 256, warmup_steps: 1, eval_every: 0, eval_blocks: 4}
    data: {seq_len: 128}          # training data (DataConfig)
    quant: {}                     # QuantConfig fields besides format and scheme
    objective: {cka: {}, kl: {}}  # ObjectiveConfig fields besides loss
    eval: {eval_blocks: 16, seq_len: 256, batch_size: 4, tasks: arc_easy,piqa, limit: 100, bootstrap: 1000,
           runtimes: [ckaqad, transformers]}   # also score each student's export as transformers serves it

With `eval.runtimes` naming `transformers` (NVFP4 only), every PTQ and trained cell is also exported
(compressed-tensors, under `OUT/exports/`) and that export, loaded by `AutoModelForCausalLM.from_pretrained`
in bf16 (`export.reader.load_served`), is scored by the same fidelity pass and tasks: its metrics carry the
prefix `served.` beside the emulated ones, so every table and paired difference exists for both forms.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ckaqad.commands import distill
from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity, token_rule
from ckaqad.eval.gsm_sem import score as gsm_sem_score
from ckaqad.eval.gsm_sem.checks import LEVELS as GSM_SEM_LEVELS
from ckaqad.eval.tasks import parse_tasks, run_tasks
from ckaqad.export.reader import load_served
from ckaqad.export.writer import export_student
from ckaqad.files import check_writable, write_json
from ckaqad.models.arch import block_kind, decoder_layers
from ckaqad.models.load import LoadedModel, load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.paths import RunDir, StudyDir
from ckaqad.quant.linear import QuantConfig
from ckaqad.report import tables
from ckaqad.report.study import SERVED_PREFIX, aggregate, method_label, write_study
from ckaqad.students.spec import build_ptq_student, load_student
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.trainer import TrainConfig

HELP = "a grid of runs (models × formats × methods × seeds × budgets) -> study.md/html/json with error bars"

SPEC_KEYS = ("name", "out", "models", "formats", "schemes", "methods", "seeds", "budgets", "pairs", "train",
             "data", "quant", "objective", "eval", "checkpoint")
# TrainConfig fields the grid sets per cell (not in the YAML's `train`).
GRID_TRAIN_FIELDS = ("steps", "seed")
# The forms of a student a study can score: ckaqad's fake-quant student (what training optimised) and its
# compressed-tensors export as transformers serves it (what users run).
RUNTIMES = ("ckaqad", "transformers")
GSM_SEM_FIELDS = ("gsm_sem", "gsm_sem_level", "gsm_sem_prompt", "gsm_sem_max_tokens")


@dataclass
class Config:
    spec: str
    """the study's YAML file: the grid and shared settings (format: docs/tasks.md#ckaqad-study)"""
    out: str | None = None
    """study directory (default: the YAML's `out`, else runs/study)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    dry_run: bool = False
    """list the cells and whether each is done, and stop"""
    train_only: bool = False
    """train (or resume) the missing cells and stop; the same command without it then evaluates them"""


@dataclass
class EvalSpec:
    eval_blocks: int = 16
    """held-out blocks of the fidelity pass"""
    seq_len: int = 256
    """tokens per held-out block"""
    batch_size: int = 4
    """blocks per forward (fidelity) and requests per batch (tasks)"""
    n_sink: int = 1
    """leading positions left out of CKA"""
    tasks: str = ""
    """comma list of eval.tasks names (empty: no tasks)"""
    limit: int | None = None
    """documents per task (a fixed seeded subset; None: all)"""
    bootstrap: int = 1000
    """bootstrap resamples of the held-out sequences for each layer's CKA interval (0: none)"""
    group: int = 3
    """students evaluated together in one fidelity pass (the teacher runs once per batch for them)"""
    runtimes: tuple[str, ...] = ("ckaqad",)
    """forms of each student scored: `ckaqad` (its fake-quant emulation) and optionally `transformers` (its
    export as transformers + compressed-tensors serve it; metrics prefixed `served.`)"""
    gsm_sem: str = ""
    """GSM-SEM variants every cell is also scored on: a `ckaqad gsm-sem generate` directory or the released files
    (empty: none); metrics `gsm_sem.acc_orig`, `.acc_var`, `.drop`, ... (docs/gsm_sem.md)"""
    gsm_sem_level: str = "min-med"
    """GSM-SEM variants at this strictness level or stricter"""
    gsm_sem_prompt: str = "8shot"
    """GSM-SEM prompt: 8shot or chat"""
    gsm_sem_max_tokens: int = 256
    """GSM-SEM maximum new tokens per answer"""

    def __post_init__(self) -> None:
        if min(self.eval_blocks, self.batch_size, self.group) < 1 or self.seq_len < 8 or self.n_sink < 0:
            raise ConfigError("eval: eval_blocks, batch_size and group must be >= 1, seq_len >= 8, n_sink >= 0")
        runtimes = list(self.runtimes) if isinstance(self.runtimes, (list, tuple)) else [self.runtimes]
        if (not runtimes or runtimes[0] != "ckaqad" or len(set(runtimes)) != len(runtimes)
                or not set(runtimes) <= set(RUNTIMES)):
            raise ConfigError(f"eval.runtimes must be [ckaqad] or [ckaqad, transformers], got {self.runtimes!r}")
        self.runtimes = tuple(runtimes)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be at least 1, got {self.limit}")
        if self.bootstrap < 0:
            raise ConfigError(f"eval.bootstrap must be >= 0, got {self.bootstrap}")
        if self.gsm_sem_level not in GSM_SEM_LEVELS or self.gsm_sem_prompt not in gsm_sem_score.PROMPT_STYLES \
                or self.gsm_sem_max_tokens < 1:
            raise ConfigError(f"eval: gsm_sem_level must be one of {', '.join(GSM_SEM_LEVELS)}, gsm_sem_prompt one "
                              f"of {', '.join(gsm_sem_score.PROMPT_STYLES)}, gsm_sem_max_tokens >= 1")
        self.task_names = parse_tasks(self.tasks) if self.tasks.strip() else []


def build_dataclass(cls, values: dict | None, where: str, fixed: tuple[str, ...] = ()):
    """`cls(**values)`, nested dataclass fields built from nested mappings; ConfigError naming `where` for an
    unknown key, a key the grid sets (`fixed`) or a value the dataclass rejects."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known or key in fixed:
            allowed = ", ".join(k for k in known if k not in fixed)
            raise ConfigError(f"{where}: unknown or grid-set key {key!r} (allowed: {allowed})")
        default = known[key].default
        nested = known[key].default_factory
        if nested is not dataclasses.MISSING and dataclasses.is_dataclass(nested):
            kwargs[key] = build_dataclass(nested, value, f"{where}.{key}")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class Cell:
    """One point of the grid. `method` is teacher, ptq or an objective; teacher has no format; teacher and
    ptq have no seed or budget."""

    model: str
    method: str
    format: str | None = None
    scheme: str | None = None
    seed: int | None = None
    steps: int | None = None

    @property
    def trains(self) -> bool:
        return self.method not in ("teacher", "ptq")

    def relative(self) -> Path:
        model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        if self.method == "teacher":
            return Path(model) / "teacher"
        parts = [model, f"{self.format}-{self.scheme}", self.method.replace("+", "-")]
        if self.trains:
            parts.append(f"seed{self.seed}-steps{self.steps}")
        return Path(*parts)

    def label(self) -> str:
        text = f"{self.model} {method_label(self.method)}"
        if self.format:
            text += f" {self.format}-{self.scheme}"
        if self.trains:
            text += f" seed {self.seed} {self.steps} steps"
        return text


@dataclass
class Study:
    """The parsed, validated YAML."""

    name: str
    out: Path
    models: list[str]
    formats: list[str]
    schemes: list[str]
    methods: list[str]
    seeds: list[int]
    budgets: list[int]
    pairs: list[tuple[str, str]]
    train: dict
    data: DataConfig
    quant: dict
    objective: dict
    eval: EvalSpec
    checkpoint: CheckpointConfig
    raw: dict = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        cells = [Cell(m, "teacher") for m in self.models]
        for m in self.models:
            for fmt in self.formats:
                for scheme in self.schemes:
                    for method in self.methods:
                        if method == "ptq":
                            cells.append(Cell(m, "ptq", fmt, scheme))
                            continue
                        cells += [Cell(m, method, fmt, scheme, seed, steps)
                                  for steps in self.budgets for seed in self.seeds]
        return cells

    def distill_config(self, cell: Cell, directory: Path, device: str | None, resume: bool) -> distill.Config:
        train = build_dataclass(TrainConfig, {**self.train, "steps": cell.steps, "seed": cell.seed,
                                              "progress": False}, "train")
        objective = build_dataclass(ObjectiveConfig, {**self.objective, "loss": cell.method}, "objective")
        return distill.Config(teacher=cell.model, device=device, out=str(directory),
                              resume=str(directory) if resume else None, train=train, objective=objective,
                              quant=self.quant_config(cell), data=self.data, checkpoint=self.checkpoint)

    def quant_config(self, cell: Cell) -> QuantConfig:
        return build_dataclass(QuantConfig, {**self.quant, "format": cell.format, "scheme": cell.scheme}, "quant")

    def cell_settings(self, cell: Cell) -> dict:
        """Everything that determines a cell's numbers (what cell.json records; a change makes it stale)."""
        evaluation = {k: v for k, v in dataclasses.asdict(self.eval).items() if k != "group"}
        if self.eval.runtimes == ("ckaqad",):
            del evaluation["runtimes"]  # the default: cells of studies from before the option stay valid
        if not self.eval.gsm_sem:
            for key in GSM_SEM_FIELDS:  # unused: cells of studies from before the option stay valid
                del evaluation[key]
        settings = {"cell": dataclasses.asdict(cell), "eval": evaluation}
        if cell.method != "teacher":
            settings["quant"] = dataclasses.asdict(self.quant_config(cell))
            settings["data"] = dataclasses.asdict(self.data)
        if cell.trains:
            settings["distill"] = distill.flat_fields(self.distill_config(cell, Path("."), None, False))
            for volatile in ("out", "resume", "device", "progress"):
                settings["distill"].pop(volatile, None)
        return json.loads(json.dumps(settings, default=list))


def _list(raw: dict, key: str, default: list, kind: type) -> list:
    value = raw.get(key, default)
    value = value if isinstance(value, list) else [value]
    if not value or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"study: {key} must be a non-empty list of {kind.__name__}, got {raw.get(key)!r}")
    if len(set(map(str, value))) != len(value):
        raise ConfigError(f"study: {key} lists a value twice: {value}")
    return value


def parse_study(path: str | Path, out: str | None = None) -> Study:
    """The study YAML, validated (every cell's distill, quant and objective settings built once)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"study config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read the study config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"study config {path} must be a YAML mapping")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"study config {path}: unknown keys {unknown} (allowed: {', '.join(SPEC_KEYS)})")
    if "models" not in raw:
        raise ConfigError(f"study config {path} needs `models` (e.g. [default])")
    methods = raw.get("methods", ["ptq", "kl", "kl+cka"])
    default_pairs = [["kl+cka", "kl"]] if isinstance(methods, list) and {"kl", "kl+cka"} <= set(methods) else []
    pairs = raw.get("pairs", default_pairs)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ConfigError(f"study: pairs must be a list of [a, b] method pairs, got {pairs!r}")
    budgets = _list(raw, "budgets", [20], int)
    seeds = _list(raw, "seeds", [0], int)
    if min(budgets) < 1:
        raise ConfigError(f"study: budgets must be >= 1 steps, got {budgets}")
    study = Study(
        name=str(raw.get("name", path.stem)), out=Path(out or raw.get("out") or "runs/study").expanduser(),
        models=_list(raw, "models", [], str), formats=_list(raw, "formats", ["nvfp4"], str),
        schemes=_list(raw, "schemes", ["w4a4"], str), methods=_list(raw, "methods", ["ptq", "kl", "kl+cka"], str),
        seeds=seeds, budgets=budgets, pairs=[(str(a), str(b)) for a, b in pairs],
        train=dict(raw.get("train") or {}), data=build_dataclass(DataConfig, raw.get("data"), "data"),
        quant=dict(raw.get("quant") or {}), objective=dict(raw.get("objective") or {}),
        eval=build_dataclass(EvalSpec, raw.get("eval"), "eval"),
        checkpoint=build_dataclass(CheckpointConfig, raw.get("checkpoint"), "checkpoint"), raw=raw)
    if not isinstance(study.train, dict) or set(study.train) & set(GRID_TRAIN_FIELDS):
        raise ConfigError(f"study: train must be a mapping without {GRID_TRAIN_FIELDS} (the grid sets them: "
                          f"budgets, seeds), got {raw.get('train')!r}")
    build_dataclass(TrainConfig, {**study.train, "steps": 1}, "train")
    if "transformers" in study.eval.runtimes and study.formats != ["nvfp4"]:
        raise ConfigError(f"study: eval.runtimes transformers serves NVFP4 exports only; formats are {study.formats}")
    for a, b in study.pairs:
        for method in (a, b):
            if method not in study.methods:
                raise ConfigError(f"study: pairs names {method!r}, which is not among the methods {study.methods}")
    for cell in study.cells():  # validate every setting before anything runs
        if cell.method != "teacher":
            study.quant_config(cell)
        if cell.trains:
            config = study.distill_config(cell, Path("."), None, False)
            tokens = config.train.batch_size * (study.data.seq_len - config.train.n_sink)
            if config.objective.uses_states and config.train.cka_tokens > tokens:
                raise ConfigError(f"study: train.cka_tokens {config.train.cka_tokens} exceeds the {tokens} valid "
                                  "tokens of a micro-batch")
    return study


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cell_state(study: Study, cell: Cell) -> str:
    """`done` (cell.json with these settings), `trained` (a finished run, not yet evaluated), `partial`
    (a run with a checkpoint to resume), `new`; ConfigError when cell.json holds other settings."""
    directory = StudyDir(study.out).cells / cell.relative()
    record = directory / StudyDir.CELL
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings_key") != settings_key(study.cell_settings(cell)):
            raise ConfigError(f"cell {cell.label()} in {directory} was computed with other settings; "
                              "choose another --out or remove that cell")
        return "done"
    if not cell.trains:
        return "new"
    run = RunDir(directory)
    if run.summary.is_file() and run.student.exists():
        return "trained"
    if run.is_run() and run.latest_checkpoint() is not None:
        return "partial"
    return "new"


def train_cell(study: Study, cell: Cell, state: str, teacher: LoadedModel, device: str | None) -> None:
    """Train (or resume) one distill cell into its directory."""
    directory = StudyDir(study.out).cells / cell.relative()
    if state == "new" and directory.exists():  # a run stopped before its first checkpoint: start it again
        shutil.rmtree(directory)
    config = study.distill_config(cell, directory, device, resume=state == "partial")
    distill.run(config, teacher_loaded=teacher)


def cell_metrics(fidelity, tasks: dict) -> dict:
    """The flat metrics of a cell: fidelity headline, `<task>.acc` / `.acc_norm` / `.perplexity`, and
    `tasks_above_chance` (how many tasks are above chance by eval.tasks.above_chance)."""
    metrics = {k: getattr(fidelity, k) for k in ("mean_cka", "min_cka", "kl_per_token", "perplexity",
                                                  "top1_agreement")} if fidelity is not None else {}
    if fidelity is not None:  # MoE students: routing drift (eval.routing), absent for dense ones
        metrics.update({k: v for k, v in (("router_jaccard", fidelity.router_jaccard),
                                          ("router_kl", fidelity.router_kl)) if v is not None})
    for task, row in tasks.items():
        for key in ("acc", "acc_norm", "perplexity"):
            if row.get(key) is not None:
                metrics[f"{task}.{key}"] = row[key]
    if tasks:
        metrics["tasks_above_chance"] = float(sum(bool(row.get("above_chance")) for row in tasks.values()))
    return metrics


def write_cell(study: Study, cell: Cell, metrics: dict, layers: list[dict], extra: dict) -> None:
    settings = study.cell_settings(cell)
    directory = StudyDir(study.out).cells / cell.relative()
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / StudyDir.CELL, {**dataclasses.asdict(cell), "metrics": metrics, "layers": layers,
                                           "settings": settings, "settings_key": settings_key(settings), **extra})


def served_label(cell: Cell) -> str:
    return f"{cell.label()} (served)"


def load_served_cell(study: Study, cell: Cell, student: torch.nn.Module, teacher: LoadedModel,
                     device: torch.device) -> tuple[torch.nn.Module, Path]:
    """Export `student` (compressed-tensors, replacing an earlier export of this cell) and load that export as
    transformers serves it (bf16, compressed-tensors decompressing the weights and quantizing the inputs).
    Returns the served model and the export directory."""
    directory = StudyDir(study.out).exports / cell.relative()
    directory.parent.mkdir(parents=True, exist_ok=True)
    export_student(student, teacher.tokenizer, directory, overwrite=True, teacher_dir=teacher.model_dir)
    return load_served(directory, device)[0], directory


def gsm_sem_cell(model: torch.nn.Module, tokenizer, ev: EvalSpec) -> dict:
    """A cell's GSM-SEM record (eval.gsm_sem's variants at eval.gsm_sem_level and their originals)."""
    return gsm_sem_score.evaluate(model, tokenizer, ev.gsm_sem, ev.gsm_sem_level, ev.gsm_sem_prompt,
                                  ev.gsm_sem_max_tokens, ev.batch_size, progress=False)


def evaluate_cells(study: Study, cells: list[Cell], teacher: LoadedModel, device: str | None) -> None:
    """Fidelity (the teacher once per batch for up to eval.group students, and their served exports when
    eval.runtimes names transformers) and tasks of `cells` of one model."""
    ev = study.eval
    served_too = "transformers" in ev.runtimes
    fid_blocks = load_blocks(DataConfig(seq_len=ev.seq_len), teacher.model, teacher.tokenizer)
    n = min(ev.eval_blocks, fid_blocks.heldout.shape[0])
    torch_device = next(teacher.model.parameters()).device
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    data_note = f"{n} held-out blocks of {ev.seq_len} tokens ({fid_blocks.source}); {token_rule(ev.n_sink)}"
    kinds = [block_kind(block) for block in decoder_layers(teacher.model)]
    calib_blocks = None
    for start in range(0, len(cells), ev.group):
        group = cells[start:start + ev.group]
        students, served, exports = {}, {}, {}
        for cell in group:
            if cell.method == "teacher":
                continue
            if cell.method == "ptq":
                calib_blocks = calib_blocks or load_blocks(study.data, teacher.model, teacher.tokenizer)
                students[cell] = build_ptq_student(teacher.model, study.quant_config(cell),
                                                   calib_blocks)[0].requires_grad_(False)
            else:
                students[cell] = load_student(StudyDir(study.out).cells / cell.relative(), teacher.model).model
            if served_too:
                served[cell], exports[cell] = load_served_cell(study, cell, students[cell], teacher, torch_device)
        started = time.perf_counter()
        with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
            labelled = {cell.label(): model for cell, model in students.items()}
            labelled.update({served_label(cell): model for cell, model in served.items()})
            results, teacher_stats = measure_fidelity(
                teacher.model, labelled or {"teacher": teacher.model},
                eval_batches(fid_blocks.heldout, ev.batch_size, torch_device, limit=n), n_sink=ev.n_sink,
                exclude_token_ids=exclude, progress=False, bootstrap=ev.bootstrap if labelled else 0)
        fidelity_s = (time.perf_counter() - started) / max(len(group), 1)
        for cell in group:
            started = time.perf_counter()
            model = teacher.model if cell.method == "teacher" else students[cell]
            tasks = run_tasks(model, teacher.tokenizer, ev.task_names, limit=ev.limit,
                              batch_size=ev.batch_size) if ev.task_names else {}
            extra: dict = {"tasks": tasks}
            if cell.method == "teacher":
                metrics = {"mean_cka": 1.0, "min_cka": 1.0, "kl_per_token": 0.0,
                           "perplexity": teacher_stats["perplexity"], "top1_agreement": 1.0,
                           **cell_metrics(None, tasks)}
                layers: list[dict] = []
            else:
                fid = results[cell.label()]
                metrics, layers = cell_metrics(fid, tasks), fid.layers
                metrics.update(tables.block_kind_metrics(fid.layers, kinds))  # hybrids: CKA per block type
            if ev.gsm_sem:
                extra["gsm_sem"] = gsm_sem_cell(model, teacher.tokenizer, ev)
                metrics.update(gsm_sem_score.headline(extra["gsm_sem"]["metrics"]))
            if cell in served:
                served_tasks = run_tasks(served[cell], teacher.tokenizer, ev.task_names, limit=ev.limit,
                                         batch_size=ev.batch_size) if ev.task_names else {}
                served_fid = results[served_label(cell)]
                metrics.update({SERVED_PREFIX + k: v for k, v in cell_metrics(served_fid, served_tasks).items()})
                if ev.gsm_sem:
                    extra["served_gsm_sem"] = gsm_sem_cell(served[cell], teacher.tokenizer, ev)
                    metrics.update({SERVED_PREFIX + k: v for k, v in
                                    gsm_sem_score.headline(extra["served_gsm_sem"]["metrics"]).items()})
                extra.update({"served_tasks": served_tasks, "served_layers": served_fid.layers,
                              "served_export": str(exports[cell])})
            write_cell(study, cell, metrics, layers,
                       {**extra, "fidelity_data": data_note,
                        "eval_s": fidelity_s + time.perf_counter() - started})
            print(f"  evaluated {cell.label()}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                               if k.removeprefix(SERVED_PREFIX)
                                                               in ("mean_cka", "kl_per_token")))
        del students, served, labelled, results  # free this group's models before the next group loads its own
        gc.collect()


def read_cells(study: Study) -> list[dict]:
    return [json.loads((StudyDir(study.out).cells / c.relative() / StudyDir.CELL).read_text())
            for c in study.cells()]


def run(config: Config) -> dict:
    """Run the missing cells, then aggregate every cell into study.json / study.md / study.html."""
    study = parse_study(config.spec, config.out)
    check_writable(study.out)
    cells = study.cells()
    states = {cell: cell_state(study, cell) for cell in cells}
    if config.dry_run:
        for cell in cells:
            print(f"{states[cell]:8s} {cell.label()}  ({StudyDir(study.out).cells / cell.relative()})")
        return {"cells": {c.label(): s for c, s in states.items()}}
    started = time.perf_counter()
    trained = evaluated = 0
    device = None
    for model in study.models:
        todo = [c for c in cells if c.model == model and states[c] != "done"]
        if not todo:
            continue
        teacher = load_model(model, device=config.device)
        device = str(next(teacher.model.parameters()).device)
        for cell in todo:
            if cell.trains and states[cell] in ("new", "partial"):
                print(f"== training {cell.label()}")
                train_cell(study, cell, states[cell], teacher, config.device)
                trained += 1
        if config.train_only:
            del teacher
            continue
        print(f"== evaluating {len(todo)} cells of {model}")
        evaluate_cells(study, todo, teacher, config.device)
        evaluated += len(todo)
        del teacher
    if config.train_only:
        print(f"trained {trained} cells; evaluate them with the same command without --train-only")
        return {"cells": {c.label(): cell_state(study, c) for c in cells}, "trained": trained}
    records = read_cells(study)
    result = aggregate(records, study.pairs)
    limit = f"a fixed seeded subset of {study.eval.limit} documents per task" if study.eval.limit else "all documents"
    meta = {"name": study.name, "spec": study.raw, "cells": len(records), "trained": trained,
            "evaluated": evaluated, "runtime_s": time.perf_counter() - started, "device": device or "(all reused)",
            "fidelity_data": records[0].get("fidelity_data") if records else None,
            "tasks_note": f"{', '.join(study.eval.task_names) or 'no tasks'}; {limit}",
            "eval_s": {Cell(**{k: r[k] for k in ("model", "method", "format", "scheme", "seed", "steps")}).label():
                       r.get("eval_s", math.nan) for r in records}}
    study.out.mkdir(parents=True, exist_ok=True)
    write_study(study.out, result, meta)
    print(StudyDir(study.out).md.read_text())
    return {"result": result, "meta": meta}
