"""The training loop, objective-agnostic: a student learns from a frozen teacher under any `Composite`
objective (KL-only QAD, CKA-QAD, self-distillation recovery, ...).

It reads top to bottom: (resume) → per step: batches → teacher and student forward → objective → backward →
finite check → optimizer step → checkpoint → eval → log. Teacher hidden states are gathered at the sampled
rows inside its forward (`capture.LayerCapture`), so the CKA term costs almost no memory. Loss terms stay
tensors until the end of a step, when one host transfer carries every logged number and the finite check.
Evaluation is a callback (`Trainee.evaluate`), so the loop needs nothing from `eval/`.

Under torchrun (`Trainee.world`, docs/distributed.md) every rank runs this loop on its slice of each global
batch and its share of the CKA rows; the objective's terms are global values on every rank, so the logged
record, the finite check and the skip decision agree everywhere, and only rank 0 logs and draws the bar.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ckaqad.capture import LayerCapture, LayerMap, RouterCapture, rank_rows, select_rows, valid_token_mask
from ckaqad.data.blocks import TokenBlocks, rank_slice, train_batches
from ckaqad.errors import ConfigError, TrainingError
from ckaqad.objectives.base import ForwardOutputs, LossParts
from ckaqad.objectives.compose import Composite
from ckaqad.parallel.dist import World, peer_failures_as_errors
from ckaqad.paths import RunDir
from ckaqad.quant.apply import weights_quantized_once_per_step
from ckaqad.registry import unknown_name
from ckaqad.train.checkpointer import CheckpointConfig, CheckpointManager
from ckaqad.train.metrics import MetricsLog
from ckaqad.train.optimizers import OPTIMIZERS, build_optimizer
from ckaqad.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 100
    """optimizer steps"""
    lr: float = 1e-5
    """peak learning rate (QAD report: ~1e-5 for RL-post-trained models, ~1e-6 for SFT-heavy ones)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 5
    """linear warmup steps before the cosine decay"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak"""
    batch_size: int = 8
    """blocks per micro-batch, all processes together (8 x 256 tokens leave room for the default 1024 CKA rows)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables)"""
    cka_tokens: int = 1024
    """token rows sampled per micro-batch (all processes together) for the CKA term (sinks and padding excluded)"""
    n_sink: int = 1
    """leading positions of each sequence excluded from CKA (attention sinks)"""
    eval_every: int = 50
    """held-out evaluation every N steps (0: only at the end)"""
    eval_blocks: int = 16
    """held-out blocks per evaluation"""
    seed: int = 0
    """random seed (data order, token sampling)"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss"""
    progress: bool = True
    """show a progress bar"""
    optimizer: str = "adamw"
    """adamw (FP32 moments) or adamw-bf16 (moments stored in bf16: half the optimizer memory)"""
    compute_dtype: str = "auto"
    """matmul precision of teacher and student: auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16"""
    quantize_once_per_step: bool = True
    """fake-quantize each weight once per optimizer step, reused by every micro-batch (same gradients)"""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer (--optimizer)", self.optimizer, OPTIMIZERS)
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("batch_size", "grad_accum", "cka_tokens", "eval_blocks", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.n_sink < 0:
            raise ConfigError("--warmup-steps, --eval-every and --n-sink must be >= 0")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise unknown_name("compute dtype (--compute-dtype)", self.compute_dtype, COMPUTE_DTYPES)


@dataclass
class StepRecord:
    step: int
    loss: float
    kl: float | None
    cka_term: float | None
    cka_weight: float
    lr: float
    grad_norm: float
    cka_layers: dict[int, float] = field(default_factory=dict)
    ce: float | None = None
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    skipped: bool = False
    other_terms: dict[str, float] = field(default_factory=dict)
    """terms and weights beyond kl, cka_term, ce and cka_weight (cosine_term, cosine_weight, ...), by name"""

    def as_log(self) -> dict:
        """The metrics.jsonl record: the fields, with `other_terms` flattened into top-level keys."""
        record = asdict(self)
        others = record.pop("other_terms")
        return {**record, **others}


@dataclass
class Trainee:
    """Everything the loop needs, built by the command: models, data, objective, optimizer, where to write."""

    config: TrainConfig
    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    blocks: TokenBlocks
    layer_map: LayerMap
    objective: Composite
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoint: CheckpointConfig
    run: RunDir
    evaluate: Callable[[], dict]
    """held-out evaluation of the student (the command passes eval/fidelity); returns a flat dict"""
    start_step: int = 0
    world: World = field(default_factory=World)
    """this process's rank and the world size (World() for a plain process)"""

    @property
    def device(self) -> torch.device:
        # The compute device: the teacher's. Under --cpu-offload the student's shards live in host memory.
        return next(self.teacher.parameters()).device


def make_optimizer(student: nn.Module, config: TrainConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (β 0.9, 0.95; fused on CUDA; `--optimizer` picks the moments' dtype) over the trainable
    parameters, with the warmup-cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    device = next(student.parameters()).device
    optimizer = build_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay,
                                betas=(0.9, 0.95), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.steps, config.warmup_steps, config.min_lr_ratio))
    return optimizer, scheduler


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def bf16_compute(device: torch.device, compute_dtype: str = "auto") -> bool:
    """Whether teacher and student run under bf16 autocast for this device and `--compute-dtype`: `auto` is
    bf16 on CUDA and fp32 on CPU. On the project's CPU (AVX-512-bf16, no AMX) a SmolLM2 layer's bf16 GEMM
    takes 1.5-2.6x its fp32 GEMM (docs/benchmarks.md §5), so bf16 is
    a choice there (`bfloat16`), not the default."""
    if compute_dtype != "auto":
        return compute_dtype == "bfloat16"
    return device.type == "cuda"


def autocast(device: torch.device, compute_dtype: str = "auto"):
    """bf16 autocast on CUDA (the teacher's deployment precision) and wherever `compute_dtype` asks for it,
    plain FP32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(device, compute_dtype))


# -------------------------------------------------------------------------------------------- one step


@dataclass
class Captures:
    """The hooks that keep hidden states at the sampled rows (None when the objective needs no states)."""

    teacher: LayerCapture | None
    student: LayerCapture | None
    layer_map: LayerMap
    teacher_routers: RouterCapture | None = None
    """router logits at every token (None unless a term reads them: router-kl)"""
    student_routers: RouterCapture | None = None

    def router_states(self) -> dict:
        """{"student_routers", "teacher_routers"} of the last forward, as ForwardOutputs keywords."""
        if self.student_routers is None:
            return {}
        return {"student_routers": self.student_routers.take(), "teacher_routers": self.teacher_routers.take()}

    def set_rows(self, rows: torch.Tensor) -> None:
        for capture in (self.teacher, self.student):
            if capture is not None:
                capture.rows = rows

    def paired_states(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """{pair index: states} of student and teacher, in the layer map's order."""
        if self.student is None:
            return {}, {}
        s, t = self.student.take(), self.teacher.take()
        pairs = self.layer_map.pairs
        return {k: s[i] for k, (i, _) in enumerate(pairs)}, {k: t[j] for k, (_, j) in enumerate(pairs)}

    def remove(self) -> None:
        for capture in (self.teacher, self.student, self.teacher_routers, self.student_routers):
            if capture is not None:
                capture.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The hooks off for a held-out evaluation between steps."""
        with contextlib.ExitStack() as stack:
            for capture in (self.teacher, self.student, self.teacher_routers, self.student_routers):
                if capture is not None:
                    stack.enter_context(capture.paused())
            yield


def micro_step(trainee: Trainee, batch: dict, rows: torch.Tensor, captures: Captures,
               row_counts: list[int] | None = None) -> LossParts:
    """Forward both models on one micro-batch (this rank's slice under torchrun) and evaluate the objective
    (tensors only)."""
    captures.set_rows(rows)
    with torch.no_grad(), autocast(trainee.device, trainee.config.compute_dtype):
        t_logits = trainee.teacher(**batch).logits
    with autocast(trainee.device, trainee.config.compute_dtype):
        s_logits = trainee.student(**batch).logits
    s_states, t_states = captures.paired_states()
    return trainee.objective(ForwardOutputs(s_logits, t_logits, batch, s_states, t_states, row_counts,
                                            **captures.router_states()))


def sample_rows(trainee: Trainee, batch: dict, step: int, micro: int) -> torch.Tensor:
    """The CKA token rows of one (global) micro-batch: a pure function of (seed, step, micro) so resumes
    agree, and the same for any number of processes (each takes its share, `capture.rank_rows`)."""
    cfg = trainee.config
    mask = valid_token_mask(batch["input_ids"], batch.get("attention_mask"), cfg.n_sink,
                            tuple(i for i in (trainee.tokenizer.bos_token_id,) if i is not None))
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
    return select_rows(mask, cfg.cka_tokens, generator)


def local_micro_batch(trainee: Trainee, batch: dict, rows: torch.Tensor
                      ) -> tuple[dict, torch.Tensor, list[int] | None]:
    """(this rank's slice of the global batch on its device, its rows, every rank's row count or None)."""
    world, device = trainee.world, trainee.device
    if not world.distributed:
        return {k: v.to(device) for k, v in batch.items()}, rows.to(device), None
    local = rank_slice(batch, world.rank, world.size)
    mine, counts = rank_rows(rows, world.rank, world.size, local["input_ids"].numel())
    return {k: v.to(device) for k, v in local.items()}, mine.to(device), counts


def _scalar(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.as_tensor(value, dtype=torch.float32).to(device).reshape(())


def train_step(trainee: Trainee, step: int, data_iter: Iterator[dict], captures: Captures) -> StepRecord:
    cfg, device = trainee.config, trainee.device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    micro_parts: list[LossParts] = []
    tokens = 0
    # Each weight is fake-quantized once for all micro-batches; the held copies are dropped before the
    # optimizer step changes the weights. Not under FSDP: holding every layer's full quantized weight
    # across micro-batches would undo the sharding.
    once = cfg.quantize_once_per_step and not trainee.world.distributed
    with weights_quantized_once_per_step(trainee.student) if once else contextlib.nullcontext():
        for micro in range(cfg.grad_accum):
            batch = next(data_iter)  # the global micro-batch, on the CPU
            tokens += batch["input_ids"].numel()
            local, rows, counts = local_micro_batch(trainee, batch, sample_rows(trainee, batch, step, micro))
            parts = micro_step(trainee, local, rows, captures, counts)
            # A non-finite loss gives non-finite gradients; the single check below skips the update.
            (parts.loss / cfg.grad_accum).backward()
            micro_parts.append(parts)
    params = [p for p in trainee.student.parameters() if p.grad is not None]
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) \
            if not trainee.world.distributed else torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm of the full gradient, the same on every rank
        grad_norm = grad_norm.full_tensor()
    # The one host transfer of the step: every logged scalar and the finite check.
    terms = ("loss", *micro_parts[0].terms)
    weight_names = tuple(micro_parts[-1].weights)
    scalars = torch.stack([_scalar(p.loss if name == "loss" else p.terms.get(name), device)
                           for p in micro_parts for name in terms]
                          + [_scalar(micro_parts[-1].weights[name], device) for name in weight_names]
                          + [_scalar(grad_norm, device)]).tolist()
    layers = [p.cka_layers for p in micro_parts if p.cka_layers is not None]
    layer_values = torch.stack(layers).to(torch.float64).tolist() if layers else []
    per_micro = [dict(zip(terms, scalars[i * len(terms):(i + 1) * len(terms)], strict=True))
                 for i in range(len(micro_parts))]
    grad_norm_value = scalars[-1]
    weights = dict(zip(weight_names, scalars[-1 - len(weight_names):-1], strict=True))
    totals = {name: sum(m[name] / cfg.grad_accum for m in per_micro) for name in terms}
    finite = all(map(_isfinite, [m["loss"] for m in per_micro] + [grad_norm_value]))
    lr = trainee.scheduler.get_last_lr()[0]
    if finite:
        trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.scheduler.step()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    layer_sums: dict[int, float] = {}
    for row in layer_values:
        for (s_index, _), value in zip(trainee.layer_map.pairs, row, strict=True):
            layer_sums[s_index] = layer_sums.get(s_index, 0.0) + value / cfg.grad_accum
    named = ("loss", "kl", "cka_term", "ce", "cka_weight")
    others = {name: value for name, value in {**totals, **weights}.items() if name not in named}
    return StepRecord(
        step=step + 1, loss=totals["loss"] if finite else float("nan"),
        kl=totals.get("kl"), cka_term=totals.get("cka_term"),
        cka_weight=weights.get("cka_weight", 0.0), lr=lr, grad_norm=grad_norm_value if finite else float("nan"),
        cka_layers=layer_sums, ce=totals.get("ce"), step_time_s=elapsed, tokens_per_s=tokens / elapsed,
        peak_memory_mb=peak, skipped=not finite, other_terms=others)


def _isfinite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


# ------------------------------------------------------------------------------------------- the loop


def make_captures(trainee: Trainee) -> Captures:
    routers = {}
    if getattr(trainee.objective, "needs_routers", False):
        routers = {"teacher_routers": RouterCapture(trainee.teacher, detach=True),
                   "student_routers": RouterCapture(trainee.student)}
    if not trainee.objective.needs_states:
        return Captures(None, None, trainee.layer_map, **routers)
    return Captures(LayerCapture(trainee.teacher, trainee.layer_map.teacher_layers, detach=True),
                    LayerCapture(trainee.student, trainee.layer_map.student_layers), trainee.layer_map, **routers)


def evaluate(trainee: Trainee) -> dict:
    """The held-out evaluation callback, with the student in eval mode for its duration. Under torchrun every
    rank scores its share of the held-out blocks on the sharded student (one block's weights gathered at a
    time, as in training) and the sums are reduced, so every rank returns the same record
    (`eval.fidelity.measure_fidelity`'s `world`)."""
    was_training = trainee.student.training
    trainee.student.eval()
    try:
        return trainee.evaluate()
    finally:
        trainee.student.train(was_training)


class _NoLog:
    """What ranks other than 0 log: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(trainee: Trainee) -> dict:
    """Run the loop from `trainee.start_step` to `config.steps`; return the final evaluation record."""
    from tqdm.auto import tqdm

    cfg, world = trainee.config, trainee.world
    log = MetricsLog(trainee.run, trainee.start_step) if world.is_main else _NoLog()
    manager = CheckpointManager(trainee.run.root, trainee.checkpoint, world)
    captures = make_captures(trainee)
    data_iter = train_batches(trainee.blocks.train, cfg.batch_size, cfg.seed, start=trainee.start_step * cfg.grad_accum)
    trainee.student.train()
    bad_in_a_row = 0
    bar = tqdm(range(trainee.start_step, cfg.steps), initial=trainee.start_step, total=cfg.steps,
               desc=trainee.objective.config.loss, disable=not (cfg.progress and world.is_main), unit="step")
    try:
        with peer_failures_as_errors(world):
            for step in bar:
                record = train_step(trainee, step, data_iter, captures)
                bad_in_a_row = bad_in_a_row + 1 if record.skipped else 0
                log.write({"kind": "train", **record.as_log()})
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(f"the loss was not finite for {bad_in_a_row} steps in a row (step "
                                        f"{record.step}); lower --lr or check the data")
                bar.set_postfix(_postfix(record))
                if manager.should_save(record.step, cfg.steps):
                    manager.save(record.step, trainee.student, trainee.optimizer, trainee.scheduler)
                if cfg.eval_every and record.step % cfg.eval_every == 0 and record.step != cfg.steps:
                    with captures.paused():
                        log.write({"kind": "eval", "step": record.step, **evaluate(trainee)})
            with captures.paused():
                final = {"kind": "eval", "step": cfg.steps, **evaluate(trainee)}
        log.write(final)
    finally:
        captures.remove()
        log.close()
    return final


def _postfix(record: StepRecord) -> dict:
    post = {"loss": f"{record.loss:.4f}", "tok/s": f"{record.tokens_per_s:.0f}"}
    if record.kl is not None:
        post["kl"] = f"{record.kl:.4f}"
    if record.cka_term is not None:
        post["1-cka"] = f"{record.cka_term:.4f}"
    return post
