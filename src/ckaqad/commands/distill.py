"""`ckaqad distill`: distil a student from its teacher — KL-only QAD, CKA-QAD, or any composition of terms —
with checkpoints, resume, metrics, TensorBoard and plots in the run directory (paths.RunDir).

The student is `--student ptq` (the teacher's calibrated fake-quant copy) or any student directory, run,
export or HF model directory (a pruned or fine-tuned model of its own depth: CKA compares blocks through
`--layer-map`). Nothing is written before every input has been checked.

Under `torchrun --nproc-per-node N -m ckaqad distill ...` the same command trains on N processes
(docs/distributed.md): the student sharded per decoder block with FSDP2, the teacher sharded or replicated
(`--teacher-sharding`), each rank a slice of every global batch (`--batch-size` counts all ranks together, so
the run computes what one process with that batch computes), sharded checkpoints (DCP), and only rank 0
printing and writing run files.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ckaqad.capture import LayerMap
from ckaqad.data.blocks import DataConfig, TokenBlocks, eval_batches, load_blocks
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.models.arch import num_layers
from ckaqad.models.load import LoadedModel, default_dtype, load_model, load_model_on_meta, resolve_device
from ckaqad.objectives.compose import Composite, ObjectiveConfig
from ckaqad.parallel.config import ParallelConfig
from ckaqad.parallel.dist import World, barrier, joined_world, max_reduce_buffers_
from ckaqad.parallel.fsdp import (
    apply_activation_checkpointing,
    choose_teacher_sharding,
    parameter_bytes,
    rank_memory_bytes,
    shard_model,
)
from ckaqad.parallel.loading import file_name, materialize_, meta_unreadable
from ckaqad.parallel.memory import return_freed_host_memory
from ckaqad.paths import RunDir
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.plots import plot_run
from ckaqad.students.spec import (
    build_ptq_student,
    calibrate_ptq_student,
    load_student,
    make_trainable,
    ptq_skeleton,
)
from ckaqad.students.store import save_student_dir
from ckaqad.train import trainer
from ckaqad.train.checkpointer import CheckpointConfig, CheckpointManager
from ckaqad.train.trainer import TrainConfig, Trainee

HELP = "quantization-aware distillation of the student: KL-only QAD or CKA-QAD (or any objective)"

# Fields that may differ between a run and its resumption.
RESUME_MAY_CHANGE = {"resume", "out", "device", "progress", "steps", "eval_every",
                     "teacher_sharding", "activation_checkpointing", "dist_timeout", "cpu_offload",
                     "quantize_once_per_step", "load_method", "shard_size_mb"}


@dataclass
class Config:
    teacher: str = "default"
    """teacher: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
    student: str = "ptq"
    """student: ptq (the teacher's calibrated fake-quant copy) or a directory: HF model, student, run or export"""
    layers: str = "all"
    """student decoder blocks in the CKA term: all, or a list like 0,4,8-11"""
    layer_map: str = "proportional"
    """student->teacher blocks for CKA: proportional (identity at equal depth) or pairs like 0:0,1:2"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/distill"
    """run directory"""
    resume: str | None = None
    """continue the run in this directory from its newest checkpoint"""
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def flat_fields(config) -> dict:
    """Every leaf field of a (nested) config dataclass by its flag name: what config.yaml holds."""
    out: dict = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def flat_defaults(cls: type) -> dict:
    """The default of every field of the dataclass `cls`, nested dataclasses flattened as `flat_fields` does."""
    out: dict = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            continue
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def check_resume_config(run: RunDir, current: dict) -> None:
    """CheckpointError naming the fields of `current` that differ from the run's saved config and may not
    change on resume."""
    if not run.config.is_file():
        raise CheckpointError(f"--resume {run.root}: not a run directory (no {run.CONFIG})")
    saved = yaml.safe_load(run.config.read_text()) or {}
    # A field added after the run was saved is absent from its config: at its default it computes what the run
    # computed (every new field's default keeps the old behaviour), so the run resumes.
    defaults = flat_defaults(Config)
    saved.update({k: v for k, v in current.items() if k not in saved and k in defaults and v == defaults[k]})
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:4])
        raise CheckpointError(f"--resume {run.root}: the config differs from the run's ({details})")


def run_dir_of(config: Config) -> RunDir:
    """The run directory, checked: an existing run to resume, or a new (empty or absent) directory."""
    run = RunDir(Path(config.resume or config.out).expanduser())
    if config.resume:
        if not run.root.is_dir():
            raise CheckpointError(f"--resume {config.resume}: no such run directory")
        check_resume_config(run, flat_fields(config))
        if run.latest_checkpoint() is None:
            raise CheckpointError(f"--resume {config.resume}: the run has no complete checkpoint")
    else:
        check_writable(run.root)
        if run.root.exists() and any(run.root.iterdir()):
            raise ConfigError(f"--out {run.root} exists and is not empty; choose another or continue it with --resume")
    return run


def rank_calibration(blocks: TokenBlocks, quant: QuantConfig, world: World, equal_counts: bool = False
                     ) -> TokenBlocks:
    """This rank's share of the calibration batches (batches r, r+N, ...; whole batches, so each is the batch
    one process would see) as the first training blocks, which is where `build_ptq_student` calibrates. A rank
    left without a batch repeats one (max-reduction makes repeats harmless). `equal_counts`: every rank gets as
    many batches as the busiest (repeating its first), as a sharded student's forward is a collective."""
    limit = min(quant.calib_batches * quant.calib_batch_size, blocks.train.shape[0])
    starts = list(range(0, limit, quant.calib_batch_size))
    mine = starts[world.rank::world.size] or [starts[world.rank % len(starts)]]
    if equal_counts:
        mine += mine[:1] * (-(-len(starts) // world.size) - len(mine))
    rows = torch.cat([blocks.train[s:min(s + quant.calib_batch_size, limit)] for s in mine])
    return dataclasses.replace(blocks, train=rows)


@dataclass
class SharedPTQ:
    """The data blocks and the calibrated PTQ student that a caller training several methods from one teacher
    and one `DataConfig` builds once (`ckaqad demo`): each run trains a deep copy, which is the student a run of
    its own would build (same blocks, same deterministic calibration), without the corpus and calibration."""

    blocks: TokenBlocks
    student: torch.nn.Module
    report: object
    """the `QuantReport` of the build"""

    def for_run(self) -> tuple[torch.nn.Module, dict]:
        print(self.report.summary())
        return copy.deepcopy(self.student), self.report.to_dict()


def make_student(config: Config, teacher: LoadedModel, blocks: TokenBlocks, world: World | None = None):
    """(student with gradients on, quantization report dict or None) from `--student`. Under torchrun each rank
    calibrates on its share of the calibration batches and the amaxes are max-reduced over ranks."""
    world = world or World()
    if config.student == "ptq":
        calibration = rank_calibration(blocks, config.quant, world) if world.distributed else blocks
        student, report = build_ptq_student(teacher.model, config.quant, calibration)
        max_reduce_buffers_(student)  # the amaxes of every rank's batches; nothing to do in a plain process
        if world.is_main:
            print(report.summary())
        return student, report.to_dict()
    # A loaded student trains as it is: quantized layers stay quantized with their saved scales, an
    # unquantized one (a pruned or fine-tuned model) trains in float32.
    loaded = load_student(config.student, teacher.model)
    student = make_trainable(loaded.model.float()).eval()
    return student, None


def fidelity_callback(teacher: LoadedModel, student: torch.nn.Module, blocks: TokenBlocks, config: Config,
                      layer_map: LayerMap, world: World | None = None):
    """The held-out evaluation the loop runs every --eval-every steps and at the end (under torchrun sharded:
    each rank scores its share of the blocks, the sums are reduced)."""
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    device = next(teacher.model.parameters()).device  # the compute device (an offloaded student's is the host)

    def evaluate() -> dict:
        with trainer.autocast(device):
            results, teacher_stats = measure_fidelity(
                teacher.model, {"student": student},
                eval_batches(blocks.heldout, config.train.batch_size, device, limit=config.train.eval_blocks),
                layer_map=layer_map, n_sink=config.train.n_sink, exclude_token_ids=exclude, progress=False,
                world=world)
        r = results["student"]
        return {"kl_per_token": r.kl_per_token, "perplexity": r.perplexity,
                "teacher_perplexity": teacher_stats["perplexity"], "top1_agreement": r.top1_agreement,
                "mean_cka": r.mean_cka, "min_cka": r.min_cka,
                "cka_layers": {row["index"]: row["cka"] for row in r.layers},
                **({"router_jaccard": r.router_jaccard, "router_kl": r.router_kl} if r.routing else {})}

    return evaluate


def build_trainee(config: Config, teacher_loaded: LoadedModel | None = None, world: World | None = None,
                  shared: SharedPTQ | None = None) -> tuple[Trainee, dict | None]:
    """Validate, load the teacher, data and student, create the optimizer, restore a checkpoint on resume.

    Nothing is written here: a run directory only appears once every input has been checked.
    """
    world = world or World()
    # A shared PTQ student stands for `--student ptq` of one process (not a rank's share of the calibration).
    assert shared is None or (config.student == "ptq" and not world.distributed)
    run = run_dir_of(config)
    cfg = config.train
    if cfg.batch_size % world.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (blocks per micro-batch, all processes together) does not "
                          f"split over {world.size} processes; choose a multiple of {world.size}")
    barrier()  # every rank has checked the run directory before rank 0 may create it
    torch.manual_seed(config.train.seed)
    on_meta = builds_on_meta(config, teacher_loaded, world)
    if not on_meta and meta_requested(config, teacher_loaded, world) and world.is_main:
        print(f"note: {config.teacher}: its weight files cannot fill a model built on meta (no safetensors, or "
              "tensors transformers converts on load other than experts), so every rank loads the whole teacher "
              "(--load-method whole)")
    if on_meta:
        teacher, blocks, student, report = build_sharded(config, world)
    else:
        teacher = teacher_loaded or load_model(config.teacher, device=world.device(config.device))
        blocks = shared.blocks if shared else load_blocks(config.data, teacher.model, teacher.tokenizer)
    tokens_per_batch = cfg.batch_size * (config.data.seq_len - cfg.n_sink)
    if config.objective.uses_states and cfg.cka_tokens > tokens_per_batch:
        raise ConfigError(f"--cka-tokens {cfg.cka_tokens} is larger than the {tokens_per_batch} valid tokens "
                          f"of a micro-batch ({cfg.batch_size} x {config.data.seq_len}, sinks excluded)")
    if not on_meta:
        student, report = shared.for_run() if shared else make_student(config, teacher, blocks, world)
    layer_map = LayerMap.parse(config.layer_map, num_layers(student), num_layers(teacher.model), config.layers)
    if not on_meta:
        place_models(student, teacher, config.parallel, world)
    optimizer, scheduler = trainer.make_optimizer(student, cfg)
    trainee = Trainee(config=cfg, teacher=teacher.model, student=student, tokenizer=teacher.tokenizer,
                      blocks=blocks, layer_map=layer_map, objective=Composite(config.objective),
                      optimizer=optimizer, scheduler=scheduler, checkpoint=config.checkpoint, run=run,
                      evaluate=fidelity_callback(teacher, student, blocks, config, layer_map, world), world=world)
    if config.resume:
        state = CheckpointManager(run.root, config.checkpoint, world).load(student, optimizer, scheduler)
        trainee.start_step = state["step"]
    return trainee, report


def meta_requested(config: Config, teacher_loaded: LoadedModel | None, world: World) -> bool:
    return (world.distributed and teacher_loaded is None and config.student == "ptq"
            and config.parallel.load_method != "whole")


def builds_on_meta(config: Config, teacher_loaded: LoadedModel | None, world: World) -> bool:
    """Whether this run builds teacher and PTQ student on the meta device and loads each rank's shards (a
    torchrun job with a ptq student; a loaded student or a teacher passed in loads as a plain process does).
    Renamed tensors and per-expert files of fused experts (every hub MoE) are read on meta
    (`parallel.loading.stored_weights`); a teacher whose files cannot be (a .bin checkpoint, a conversion other
    than merging experts: `meta_unreadable`) is loaded whole, as `--load-method whole`."""
    if not meta_requested(config, teacher_loaded, world):
        return False
    meta = load_model_on_meta(config.teacher, torch.float32)  # no weights: a config and a tokenizer
    return meta_unreadable(meta.model, meta.model_dir) is None


def build_sharded(config: Config, world: World) -> tuple[LoadedModel, TokenBlocks, torch.nn.Module, dict]:
    """(teacher, data, student, quantization report) of a torchrun job, never whole in any process: both
    models built on the meta device and sharded (place_models), then each rank fills its shards from the
    teacher's safetensors files (a GGUF teacher's cache), and the student is calibrated sharded, each rank on
    its share of the calibration batches, amaxes max-reduced (docs/distributed.md#meta-device-construction).
    Numbers: those of `make_student` in one process (a test compares the runs)."""
    device = resolve_device(world.device(config.device))
    teacher = load_model_on_meta(config.teacher, default_dtype(device))
    student, report = ptq_skeleton(teacher.model, config.quant)
    place_models(student, teacher, config.parallel, world, device=device)
    method = config.parallel.load_method
    materialize_(teacher.model, teacher.model_dir, device, method)
    # the plain path copies the loaded teacher into float32: the file's values rounded to the teacher's dtype
    # of each tensor (bf16, or float32 where the model keeps it: nemotron_h's and deepseek_v3's routers)
    dtypes = {file_name(n): t.dtype for n, t in [*teacher.model.named_parameters(), *teacher.model.named_buffers()]}
    materialize_(student, teacher.model_dir, device, method,
                 round_to=dtypes if any(d != torch.float32 for d in dtypes.values()) else None)
    teacher.on_meta = False
    blocks = load_blocks(config.data, teacher.model, teacher.tokenizer)
    calibration = rank_calibration(blocks, config.quant, world, equal_counts=True)
    calibrate_ptq_student(student, report, config.quant, calibration, device)
    max_reduce_buffers_(student)
    if world.is_main:
        print(report.summary())
    return teacher, blocks, student, report.to_dict()


def place_models(student: torch.nn.Module, teacher: LoadedModel, parallel: ParallelConfig, world: World,
                 device: torch.device | None = None) -> str | None:
    """Activation checkpointing (any world) and, under torchrun, FSDP2: the student sharded per block, the
    teacher sharded or replicated. Returns the teacher's placement (None for a plain process). `device`: where
    the shards go (default: where the student's parameters are; a meta-built student's are nowhere yet)."""
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(student)
    if not world.distributed:
        if parallel.cpu_offload:
            raise ConfigError("--cpu-offload needs a sharded run (torchrun): FSDP2 offloads the student's shards")
        return None
    device = device or next(student.parameters()).device
    shard_model(student, device, trainable=True, cpu_offload=parallel.cpu_offload)
    placement = choose_teacher_sharding(parallel.teacher_sharding, parameter_bytes(teacher.model),
                                        rank_memory_bytes(device))
    if placement == "shard":
        shard_model(teacher.model, device, trainable=False)
    return placement


def write_run_files(trainee: Trainee, config: Config, report: dict | None) -> None:
    trainee.run.root.mkdir(parents=True, exist_ok=True)
    write_text(trainee.run.config, yaml.safe_dump(flat_fields(config), sort_keys=True))
    if report is not None:
        write_json(trainee.run.quantization, report)


def write_final_student(trainee: Trainee, config: Config, world: World) -> None:
    """The run's student/ directory, in safetensors files of at most --shard-size-mb. A sharded student is
    streamed one parameter at a time from every rank's shards to rank 0's files (`store.write_student_weights`):
    no process holds the full state dict, and the files equal those one process writes, byte for byte."""
    extra = {"label": trainee.run.root.name, "step": config.train.steps, "teacher": config.teacher}
    shard_bytes = config.checkpoint.shard_size_bytes
    if not world.is_main:
        save_student_dir(trainee.student, None, shard_size_bytes=shard_bytes)  # this rank's shards, gathered
        return
    with atomic_directory(trainee.run.student.root) as tmp:
        save_student_dir(trainee.student, tmp, trainee.tokenizer, extra=extra, shard_size_bytes=shard_bytes)


def run(config: Config, teacher_loaded: LoadedModel | None = None, shared: SharedPTQ | None = None) -> dict:
    """Build (or resume) and train; write the final student, plots and summary.json; return the summary.
    Under torchrun every rank runs this; rank 0 alone writes files and prints."""
    with joined_world(config.device, config.parallel.dist_timeout) as world:
        return _run(config, teacher_loaded, world, shared)


def _run(config: Config, teacher_loaded: LoadedModel | None, world: World, shared: SharedPTQ | None = None) -> dict:
    # ConfigError for a device that is none. Under torchrun on CPU the host RSS per rank is what the planner
    # sizes, so freed tensors go back to the system (no number changes). Not in a plain process: every
    # allocation then costs an mmap and page faults, and the step was 35 % slower (docs/distributed.md).
    if resolve_device(world.device(config.device)).type == "cpu" and world.distributed:
        return_freed_host_memory()
    trainee, report = build_trainee(config, teacher_loaded, world, shared)
    if trainee.start_step == 0 and world.is_main:
        write_run_files(trainee, config, report)
    barrier()
    final = trainer.train(trainee)
    summary = {"final": final, "steps": config.train.steps, "loss": config.objective.loss,
               # W4A4 turns float32 summation-order differences into FP4 rounding flips, so runs on CPU compare
               # only at equal intra-op threads (docs/distributed.md#equal-arithmetic); torchrun sets 1 per rank.
               "cpu_threads": torch.get_num_threads(),
               # how the models came to be: built on meta and read shard by shard, or loaded whole per process
               "build": "meta" if builds_on_meta(config, teacher_loaded, world) else "whole"}
    write_final_student(trainee, config, world)
    if world.is_main:
        plot_run(trainee.run.root)
        write_json(trainee.run.summary, summary)
        if config.train.progress:
            print(f"{config.objective.loss}: held-out KL {final['kl_per_token']:.4f}, ppl {final['perplexity']:.3f} "
                  f"(teacher {final['teacher_perplexity']:.3f}), top-1 {final['top1_agreement']:.3f}, "
                  f"mean CKA {final['mean_cka']:.4f}, min CKA {final['min_cka']:.4f} -> {trainee.run.root}")
    barrier()
    return summary
