"""Quantization-aware distillation: KL-only QAD or CKA-QAD of a fake-quantized student against its teacher.

The loop reads top to bottom: build → (resume) → per step: batches → teacher and student forward → loss →
finite check → optimizer step → checkpoint → eval → log. Teacher hidden states are gathered at the sampled
rows inside its forward (capture.LayerCapture), so the CKA term costs almost no memory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.capture import LayerCapture, select_rows, valid_token_mask
from ckaqad.checkpoint import CheckpointConfig, CheckpointManager
from ckaqad.data import DataConfig, eval_batches, load_blocks, train_batches
from ckaqad.errors import CheckpointError, CkaqadError, ConfigError
from ckaqad.losses import LossConfig, chunked_kl, cka_term, combine, next_token_nll
from ckaqad.quantize import QuantConfig, build_student, calibrate


class TrainingError(CkaqadError):
    """Training cannot continue (for example, the loss stayed non-finite)."""


@dataclass
class DistillConfig:
    teacher: str = "default"
    """teacher: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
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
    """blocks per micro-batch (the default 8 x 256 tokens leaves room for the default 1024 CKA rows)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables)"""
    cka_tokens: int = 1024
    """token rows sampled per micro-batch for the CKA term (sinks and padding excluded)"""
    layers: str = "all"
    """decoder blocks in the CKA term: all, or a list like 0,4,8-11"""
    n_sink: int = 1
    """leading positions of each sequence excluded from CKA (attention sinks)"""
    eval_every: int = 50
    """held-out evaluation every N steps (0: only at the end)"""
    eval_blocks: int = 16
    """held-out blocks per evaluation"""
    seed: int = 0
    """random seed (data order, token sampling)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/distill"
    """run directory"""
    resume: str | None = None
    """continue the run in this directory from its newest checkpoint"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("batch_size", "grad_accum", "cka_tokens", "eval_blocks", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.n_sink < 0:
            raise ConfigError("--warmup-steps, --eval-every and --n-sink must be >= 0")


# Fields that may differ between a run and its resumption.
RESUME_MAY_CHANGE = {"resume", "out", "device", "progress", "steps", "eval_every"}


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


@dataclass
class Run:
    """Everything the loop needs, built once."""

    config: DistillConfig
    loss: LossConfig
    quant: QuantConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    blocks: object
    layers: list[int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    out: Path
    start_step: int = 0
    report: object = None


def all_configs(run_config: DistillConfig, loss: LossConfig, quant: QuantConfig, data: DataConfig,
                checkpoint: CheckpointConfig) -> dict:
    return {**asdict(run_config), **asdict(loss), **asdict(quant), **asdict(data), **asdict(checkpoint)}


def lr_lambda(config: DistillConfig):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(config.steps - config.warmup_steps, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def check_resume_config(run_dir: Path, current: dict) -> None:
    import yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differ = sorted(k for k in set(saved) | set(current) if k not in RESUME_MAY_CHANGE
                    and _plain(saved.get(k)) != _plain(current.get(k)))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:4])
        raise CheckpointError(f"--resume {run_dir}: the config differs from the run's ({details})")


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def build_run(config: DistillConfig, loss: LossConfig, quant: QuantConfig, data: DataConfig,
              checkpoint: CheckpointConfig, teacher_loaded=None) -> Run:
    """Validate, load the teacher and data, build and calibrate the student, create the optimizer.

    Nothing is written here: a run directory only appears once every input has been checked.
    """
    from ckaqad.diagnose import parse_layers
    from ckaqad.files import check_writable
    from ckaqad.models import load_model, num_layers

    out = Path(config.resume or config.out).expanduser()
    if config.resume:
        if not out.is_dir():
            raise CheckpointError(f"--resume {config.resume}: no such run directory")
        check_resume_config(out, all_configs(config, loss, quant, data, checkpoint))
        if CheckpointManager(out, checkpoint).latest() is None:
            raise CheckpointError(f"--resume {config.resume}: the run has no complete checkpoint")
    else:
        check_writable(out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty; choose another or continue it with --resume")
    torch.manual_seed(config.seed)
    loaded = teacher_loaded or load_model(config.teacher, device=config.device)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    layers = parse_layers(config.layers, num_layers(teacher))
    blocks = load_blocks(data, teacher, tokenizer)
    tokens_per_batch = config.batch_size * (data.seq_len - config.n_sink)
    if loss.uses_cka and config.cka_tokens > tokens_per_batch:
        raise ConfigError(f"--cka-tokens {config.cka_tokens} is larger than the {tokens_per_batch} valid tokens "
                          f"of a micro-batch ({config.batch_size} x {data.seq_len}, sinks excluded)")
    device = next(teacher.parameters()).device
    student, report = build_student(teacher, quant)
    calib = eval_batches(blocks.train, config.batch_size, device, limit=quant.calib_batches * config.batch_size)
    calibrate(student, calib)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    run = Run(config=config, loss=loss, quant=quant, data=data, checkpoint=checkpoint, teacher=teacher,
              student=student, tokenizer=tokenizer, blocks=blocks, layers=layers, optimizer=optimizer,
              scheduler=scheduler, device=device, out=out, report=report)
    if config.resume:
        state = CheckpointManager(out, checkpoint).load(student, optimizer, scheduler)
        run.start_step = state["step"]
    return run


# -------------------------------------------------------------------------------------------- one step


def micro_step(run: Run, batch: dict, rows: torch.Tensor, teacher_capture: LayerCapture | None,
               student_capture: LayerCapture | None) -> tuple[torch.Tensor, dict]:
    """Forward both models on one micro-batch and return (loss, parts)."""
    cfg = run.loss
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    with torch.no_grad(), autocast:
        if teacher_capture is not None:
            teacher_capture.rows = rows
        t_logits = run.teacher(**batch).logits
    with autocast:
        if student_capture is not None:
            student_capture.rows = rows
        s_logits = run.student(**batch).logits
    parts: dict = {}
    kl = chunked_kl(s_logits, t_logits, batch.get("attention_mask"), cfg.temperature, cfg.topk, cfg.topk_tail) \
        if cfg.uses_kl else None
    cka = None
    if cfg.uses_cka:
        cka, parts["cka_layers"] = cka_term(student_capture.states, teacher_capture.states)
        student_capture.clear()
        teacher_capture.clear()
    loss, lam = combine(kl, cka, cfg)
    if cfg.ce_weight:
        nll, count = next_token_nll(s_logits, batch["input_ids"], batch.get("attention_mask"))
        ce = nll / max(count, 1)
        loss = loss + cfg.ce_weight * ce
        parts["ce"] = float(ce.detach())
    parts.update(kl=None if kl is None else float(kl.detach()), cka_term=None if cka is None else float(cka.detach()),
                 cka_weight=lam)
    return loss, parts


def sample_rows(run: Run, batch: dict, step: int, micro: int) -> torch.Tensor:
    """The CKA token rows of one micro-batch: a pure function of (seed, step, micro) so resumes agree."""
    mask = valid_token_mask(batch["input_ids"], batch.get("attention_mask"), run.config.n_sink,
                            tuple(i for i in (run.tokenizer.bos_token_id,) if i is not None))
    generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + step * 1009 + micro)
    return select_rows(mask, run.config.cka_tokens, generator)


def train_step(run: Run, step: int, data_iter, captures) -> StepRecord:
    start = time.perf_counter()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    totals: dict = {"loss": 0.0, "kl": 0.0, "cka_term": 0.0, "ce": 0.0}
    layer_sums: dict[int, float] = {}
    finite = True
    tokens = 0
    lam = 0.0
    for micro in range(run.config.grad_accum):
        batch = next(data_iter)
        tokens += batch["input_ids"].numel()
        rows = sample_rows(run, batch, step, micro)
        loss, parts = micro_step(run, batch, rows, *captures)
        if not torch.isfinite(loss):
            finite = False
            break
        (loss / run.config.grad_accum).backward()
        totals["loss"] += float(loss.detach()) / run.config.grad_accum
        for key in ("kl", "cka_term", "ce"):
            if parts.get(key) is not None:
                totals[key] += parts[key] / run.config.grad_accum
        for layer, value in parts.get("cka_layers", {}).items():
            layer_sums[layer] = layer_sums.get(layer, 0.0) + value / run.config.grad_accum
        lam = parts["cka_weight"]
    grad_norm = float("nan")
    if finite:
        params = [p for p in run.student.parameters() if p.grad is not None]
        if run.config.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        finite = math.isfinite(grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda" else 0.0
    return StepRecord(
        step=step + 1, loss=totals["loss"] if finite else float("nan"),
        kl=totals["kl"] if run.loss.uses_kl else None,
        cka_term=totals["cka_term"] if run.loss.uses_cka else None, cka_weight=lam, lr=lr, grad_norm=grad_norm,
        cka_layers=layer_sums, ce=totals["ce"] if run.loss.ce_weight else None, step_time_s=elapsed,
        tokens_per_s=tokens / elapsed, peak_memory_mb=peak, skipped=not finite)


# ------------------------------------------------------------------------------------------- the loop


class MetricsLog:
    """metrics.jsonl (one line per step and per evaluation) and TensorBoard scalars."""

    def __init__(self, out: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        if self.path.exists():  # resuming: drop what the killed run logged after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        prefix = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step" and value is not None:
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        for layer, value in (record.get("cka_layers") or {}).items():
            self.writer.add_scalar(f"{prefix}_cka_layer/{int(layer):02d}", value, step)

    def close(self) -> None:
        self.writer.close()


def evaluate_student(run: Run, progress: bool = False) -> dict:
    from ckaqad.diagnose import measure_fidelity

    was_training = run.student.training
    run.student.eval()
    exclude = tuple(i for i in (run.tokenizer.bos_token_id,) if i is not None)
    try:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
            results, teacher = measure_fidelity(
                run.teacher, {"student": run.student},
                eval_batches(run.blocks.heldout, run.config.batch_size, run.device, limit=run.config.eval_blocks),
                layers=run.layers, n_sink=run.config.n_sink, exclude_token_ids=exclude, progress=progress)
    finally:
        run.student.train(was_training)
    r = results["student"]
    return {"kl_per_token": r.kl_per_token, "perplexity": r.perplexity, "teacher_perplexity": teacher["perplexity"],
            "top1_agreement": r.top1_agreement, "mean_cka": r.mean_cka, "min_cka": r.min_cka,
            "cka_layers": {row["index"]: row["cka"] for row in r.layers}}


def write_run_files(run: Run) -> None:
    import yaml

    run.out.mkdir(parents=True, exist_ok=True)
    configs = all_configs(run.config, run.loss, run.quant, run.data, run.checkpoint)
    (run.out / "config.yaml").write_text(yaml.safe_dump({k: _plain(v) for k, v in configs.items()}, sort_keys=True))
    run.report.save(run.out / "quantization.json")


def train(run: Run) -> dict:
    """Run the loop from `run.start_step` to `config.steps`; return the final summary."""
    from tqdm.auto import tqdm

    from ckaqad.files import atomic_directory
    from ckaqad.students import save_student_dir

    cfg = run.config
    if run.start_step == 0:
        write_run_files(run)
    log = MetricsLog(run.out, run.start_step)
    manager = CheckpointManager(run.out, run.checkpoint)
    captures = (LayerCapture(run.teacher, run.layers, detach=True), LayerCapture(run.student, run.layers)) \
        if run.loss.uses_cka else (None, None)
    data_iter = train_batches(run.blocks.train, cfg.batch_size, cfg.seed, start=run.start_step * cfg.grad_accum,
                              device=run.device)
    bad_in_a_row = 0
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, desc=f"{run.loss.loss}",
               disable=not cfg.progress, unit="step")
    try:
        for step in bar:
            record = train_step(run, step, data_iter, captures)
            bad_in_a_row = bad_in_a_row + 1 if record.skipped else 0
            log.write({"kind": "train", **asdict(record)})
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingError(f"the loss was not finite for {bad_in_a_row} steps in a row (step {record.step}); "
                                    "lower --lr or check the data")
            bar.set_postfix(_postfix(record))
            if manager.should_save(record.step, cfg.steps):
                manager.save(record.step, run.student, run.quant, run.optimizer, run.scheduler)
            if cfg.eval_every and record.step % cfg.eval_every == 0 and record.step != cfg.steps:
                log.write({"kind": "eval", "step": record.step, **evaluate_student(run)})
        final = {"kind": "eval", "step": cfg.steps, **evaluate_student(run)}
        log.write(final)
    finally:
        for capture in captures:
            if capture is not None:
                capture.remove()
        log.close()
    with atomic_directory(run.out / "student") as tmp:
        save_student_dir(run.student, run.quant, tmp, run.tokenizer, extra={"label": run.out.name, "step": cfg.steps})
    plot_run(run.out)
    summary = {"final": final, "steps": cfg.steps, "loss": run.loss.loss}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _postfix(record: StepRecord) -> dict:
    post = {"loss": f"{record.loss:.4f}", "tok/s": f"{record.tokens_per_s:.0f}"}
    if record.kl is not None:
        post["kl"] = f"{record.kl:.4f}"
    if record.cka_term is not None:
        post["1-cka"] = f"{record.cka_term:.4f}"
    return post


# ------------------------------------------------------------------------------------------------ plots


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("kind") == "train"], [r for r in lines if r.get("kind") == "eval"]


def plot_run(run_dir: Path) -> None:
    """loss_curves.png (loss terms per step) and cka_drift.png (layer x eval step CKA heatmap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, eval_rows = read_metrics(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in train_rows]
    for key, ax in (("kl", axes[0]), ("cka_term", axes[1])):
        values = [r.get(key) for r in train_rows]
        if any(v is not None for v in values):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=f"train {key}")
        ax.set_xlabel("step")
        ax.set_title("KL(teacher‖student) per token" if key == "kl" else "mean (1 − CKA) over layers")
        ax.grid(alpha=0.3)
    if eval_rows:
        axes[0].plot([r["step"] for r in eval_rows], [r["kl_per_token"] for r in eval_rows], "o-", label="held-out")
        axes[1].plot([r["step"] for r in eval_rows], [1 - r["mean_cka"] for r in eval_rows], "o-", label="held-out")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    if eval_rows:
        layers = sorted({int(k) for r in eval_rows for k in r["cka_layers"]})
        grid = [[r["cka_layers"].get(str(i), r["cka_layers"].get(i, float("nan"))) for r in eval_rows] for i in layers]
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(eval_rows) + 2), 0.18 * len(layers) + 2))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax.set_xticks(range(len(eval_rows)), [str(r["step"]) for r in eval_rows])
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("step")
        ax.set_ylabel("decoder block")
        ax.set_title("held-out CKA to the teacher")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(run_dir / "cka_drift.png", dpi=120)
        plt.close(fig)


def run_distill(config: DistillConfig, loss: LossConfig, quant: QuantConfig, data: DataConfig,
                checkpoint: CheckpointConfig, teacher_loaded=None) -> dict:
    """`ckaqad distill`: build (or resume) and train; returns the summary."""
    run = build_run(config, loss, quant, data, checkpoint, teacher_loaded)
    summary = train(run)
    if config.progress:
        final = summary["final"]
        print(f"{run.loss.loss}: held-out KL {final['kl_per_token']:.4f}, ppl {final['perplexity']:.3f} "
              f"(teacher {final['teacher_perplexity']:.3f}), top-1 {final['top1_agreement']:.3f}, "
              f"mean CKA {final['mean_cka']:.4f}, min CKA {final['min_cka']:.4f} -> {run.out}")
    return summary
