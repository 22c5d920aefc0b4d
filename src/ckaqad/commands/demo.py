"""`ckaqad demo` (what `make demo` runs): teacher → NVFP4 PTQ → KL-QAD and CKA-QAD with the same budget and
seed → one diagnosis of all of them on the same held-out tokens → `report.md` and `report.html`.

On CPU the default budget is sized to finish in about ten minutes on 2 cores; on a GPU it is larger.
`--recovery` runs the recovery demo instead (`run_recovery`, docs/recovery.md): damage, then KL and KL+CKA
self-distillation recovery, and one recovery report with the CKA-recovery correlation.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckaqad.commands import distill, recover
from ckaqad.damage.forget import ForgetConfig, arithmetic_corpus
from ckaqad.damage.kinds import DAMAGE_KINDS
from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity, token_rule
from ckaqad.files import check_writable
from ckaqad.models.load import load_model
from ckaqad.objectives.compose import ObjectiveConfig
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.html import write_page
from ckaqad.report.plots import plot_cka_layers, plot_loss_comparison
from ckaqad.report.results import ModelResult, write_results
from ckaqad.report.tables import layer_table
from ckaqad.students.spec import build_ptq_student, load_student
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.metrics import read_metrics
from ckaqad.train.trainer import TrainConfig

HELP = "embedded model -> PTQ -> KL-QAD and CKA-QAD -> diagnosis -> report.md/report.html"


@dataclass
class Config:
    teacher: str = "default"
    """teacher: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
    format: str = "nvfp4"
    """student format"""
    scheme: str = "w4a4"
    """student scheme"""
    steps: int = 0
    """optimizer steps per method (0: 30 on CPU, 400 on GPU)"""
    lr: float = 0.0
    """peak learning rate (0: 5e-5 on CPU for the short budget, 1e-5 on GPU)"""
    batch_size: int = 0
    """blocks per step (0: 4 on CPU, 16 on GPU)"""
    seq_len: int = 0
    """tokens per block (0: 128 on CPU, 512 on GPU)"""
    cka_tokens: int = 256
    """token rows per step for the CKA term"""
    eval_blocks: int = 24
    """held-out blocks for the final diagnosis"""
    data: str | None = None
    """local data file or directory (default: the built-in corpus)"""
    seed: int = 0
    """random seed shared by both methods"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/demo"
    """output directory for the report and both runs"""
    recovery: bool = False
    """the recovery demo instead: damage the teacher (--recovery-kinds), recover each with KL and KL+CKA"""
    recovery_kinds: str = "wanda,forget"
    """damage kinds of the recovery demo, comma-separated: magnitude, wanda, 2:4, drop-blocks, forget, nvfp4"""
    arithmetic: str = "reference"
    """student arithmetic: reference (ckaqad's), runtime (compressed-tensors' served forward) or vllm-emulation"""
    compute_dtype: str = "auto"
    """matmul precision: auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16"""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 0 or self.seq_len < 0 or self.lr < 0:
            raise ConfigError("--steps, --batch-size, --seq-len and --lr must be >= 0 (0 picks the default)")

    def resolved(self, device: torch.device) -> Config:
        gpu = device.type == "cuda"
        pick = lambda value, cpu, cuda: value or (cuda if gpu else cpu)  # noqa: E731
        return Config(**{**asdict(self), "steps": pick(self.steps, 30, 400), "lr": pick(self.lr, 5e-5, 1e-5),
                             "batch_size": pick(self.batch_size, 4, 16), "seq_len": pick(self.seq_len, 128, 512)})


METHODS = {"KL-QAD": "kl", "CKA-QAD": "kl+cka"}


def method_dir(out: Path, loss: str) -> Path:
    """Where the demo keeps the run of one method (`runs/kl`, `runs/kl-cka`)."""
    return out / "runs" / loss.replace("+", "-")


def run(config: Config) -> dict:
    out = check_writable(config.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory")
    if config.recovery:
        return run_recovery(config, out)
    QuantConfig(format=config.format, scheme=config.scheme, arithmetic=config.arithmetic)
    started = time.perf_counter()
    loaded = load_model(config.teacher, device=config.device)
    device = next(loaded.model.parameters()).device
    cfg = config.resolved(device)
    # distill checks this per run, but only when the CKA-QAD run starts, after the KL-QAD run has trained.
    valid = cfg.batch_size * (cfg.seq_len - TrainConfig.n_sink)
    if cfg.cka_tokens > valid:
        raise ConfigError(f"--cka-tokens {cfg.cka_tokens} is larger than the {valid} valid tokens of a step "
                          f"({cfg.batch_size} x {cfg.seq_len}, sinks excluded); lower it or raise --batch-size")
    data = DataConfig(data=cfg.data, seq_len=cfg.seq_len)
    quant = QuantConfig(format=cfg.format, scheme=cfg.scheme, arithmetic=cfg.arithmetic)
    print(f"demo on {device}: {cfg.format} {cfg.scheme}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} "
          f"tokens per method, lr {cfg.lr}")
    # The corpus and the calibrated PTQ student are built once: both methods train copies of it, and the
    # diagnosis measures it untouched (each run and the diagnosis used to rebuild both: 15-20 s of the job).
    blocks = load_blocks(data, loaded.model, loaded.tokenizer)
    ptq, report = build_ptq_student(loaded.model, quant, blocks)
    shared = distill.SharedPTQ(blocks, ptq, report)
    summaries = {}
    for label, loss in METHODS.items():
        train = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, cka_tokens=cfg.cka_tokens,
                            eval_every=max(cfg.steps // 3, 1), eval_blocks=min(8, cfg.eval_blocks), seed=cfg.seed,
                            warmup_steps=max(cfg.steps // 20, 1), compute_dtype=cfg.compute_dtype)
        run_cfg = distill.Config(teacher=cfg.teacher, device=cfg.device, out=str(method_dir(out, loss)), train=train,
                                 objective=ObjectiveConfig(loss=loss), quant=quant, data=data,
                                 checkpoint=CheckpointConfig(save_every=cfg.steps, keep_last=1))
        print(f"== {label} ({loss})")
        summaries[label] = distill.run(run_cfg, teacher_loaded=loaded, shared=shared)
    # One diagnosis of PTQ and both trained students on the same held-out tokens.
    students = {"PTQ": ptq.requires_grad_(False)}
    for label, loss in METHODS.items():
        students[label] = load_student(method_dir(out, loss), loaded.model).model
    n_eval = min(cfg.eval_blocks, blocks.heldout.shape[0])
    exclude = tuple(i for i in (loaded.tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        results, teacher_stats = measure_fidelity(loaded.model, students,
                                                  eval_batches(blocks.heldout, cfg.batch_size, device, limit=n_eval),
                                                  exclude_token_ids=exclude)
    training = {label: training_stats(method_dir(out, loss)) for label, loss in METHODS.items()}
    meta = {"config": asdict(cfg), "device": str(device), "data": blocks.describe(), "token_rule": token_rule(1),
            "eval_blocks": n_eval, "runtime_s": time.perf_counter() - started}
    write_report(out, results, teacher_stats, training, meta)
    print(f"wrote {out}/report.md and report.html ({meta['runtime_s']:.0f} s)")
    return {"results": results, "teacher": teacher_stats, "training": training, "meta": meta}


def training_stats(run_dir: Path) -> dict:
    rows, _ = read_metrics(run_dir)
    rows = [r for r in rows if not r.get("skipped")]
    times = [r["step_time_s"] for r in rows[1:]] or [r["step_time_s"] for r in rows]
    return {"median_step_s": statistics.median(times) if times else float("nan"),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows) if rows else float("nan"),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=0.0),
            "final_loss": rows[-1]["loss"] if rows else float("nan")}


def write_report(out: Path, results: dict, teacher_stats: dict, training: dict, meta: dict) -> None:
    """report.md, report.html, report.json, results.json and the two plots of the demo."""
    curves = {"teacher": [(row["index"], 1.0) for row in next(iter(results.values())).layers]}
    curves.update({label: [(row["index"], row["cka"]) for row in r.layers] for label, r in results.items()})
    plot_cka_layers(curves, out / "cka_layers.png", "Per-layer CKA to the teacher: PTQ vs KL-QAD vs CKA-QAD")
    plot_loss_comparison({label: method_dir(out, loss) for label, loss in METHODS.items()}, out / "loss_curves.png")
    cfg = meta["config"]
    rows = ["| model | KL/token | ppl | top-1 agree | mean CKA | min CKA (layer) | step time | tokens/s | peak mem |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| teacher (BF16/FP32) | 0 | {teacher_stats['perplexity']:.3f} | 1 | 1 | 1 | – | – | – |"]
    for label, r in results.items():
        t = training.get(label)
        timing = (f"{t['median_step_s'] * 1000:.0f} ms | {t['tokens_per_s']:.0f} | "
                  f"{t['peak_memory_mb']:.0f} MB" if t and t["peak_memory_mb"] else
                  f"{t['median_step_s'] * 1000:.0f} ms | {t['tokens_per_s']:.0f} | n/a (CPU)") if t else "– | – | –"
        rows.append(f"| {label} | {r.kl_per_token:.4f} | {r.perplexity:.3f} | {r.top1_agreement:.3f} | "
                    f"{r.mean_cka:.4f} | {r.min_cka:.4f} ({r.min_cka_layer}) | {timing} |")
    md = [
        "# ckaqad demo: NVFP4 PTQ vs KL-QAD vs CKA-QAD", "",
        f"Teacher `{cfg['teacher']}` on {meta['device']}; student {cfg['format']} {cfg['scheme']} "
        f"(weights and Linear inputs fake-quantized, lm_head kept). Both methods start from the same calibrated "
        f"PTQ student and train {cfg['steps']} steps of {cfg['batch_size']}×{cfg['seq_len']} tokens, "
        f"lr {cfg['lr']} (warmup + cosine), seed {cfg['seed']}. KL-QAD minimises KL(teacher‖student); "
        f"CKA-QAD adds λ·mean(1−CKA) over all decoder blocks on {cfg['cka_tokens']} sampled tokens per step, "
        "λ auto-balanced to the KL term.", "",
        f"Data: {meta['data']}. Held-out evaluation on {meta['eval_blocks']} blocks; CKA over "
        f"{meta['token_rule']}.", "",
        "## Fidelity to the teacher (held out)", "", *rows, "",
        "![per-layer CKA](cka_layers.png)", "", "![loss curves](loss_curves.png)", "",
        "Drift during training (held-out CKA per layer and step): "
        "[KL-QAD](runs/kl/cka_drift.png), [CKA-QAD](runs/kl-cka/cka_drift.png).", "",
        "## Per-layer CKA", "", *layer_table(results), "",
        f"Total run time {meta['runtime_s']:.0f} s. Runs, checkpoints, metrics.jsonl and TensorBoard logs are in "
        "`runs/`; the trained students in `runs/*/student/` (load with `ckaqad diagnose --student` or export "
        "with `ckaqad export`).", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    write_page(out / "report.html", text, "ckaqad demo")
    (out / "report.json").write_text(json.dumps({
        "teacher": teacher_stats, "models": {k: v.to_dict() for k, v in results.items()}, "training": training,
        **meta}, indent=2))
    write_results(out, "demo", [ModelResult.from_fidelity(r, training=training.get(label, {}))
                                for label, r in results.items()],
                  teacher={"source": cfg["teacher"], **teacher_stats}, meta=meta)


# ------------------------------------------------------------------------------ ckaqad demo --recovery

RECOVERY_LOSSES = ("kl", "kl+cka")
# What each damage kind of the recovery demo does (damage.Config fields beyond the shared ones).
RECOVERY_DAMAGE = {"magnitude": {"sparsity": 0.5}, "wanda": {"sparsity": 0.5}, "2:4": {"score": "wanda"},
                   "drop-blocks": {"drop": 3}, "forget": {}, "nvfp4": {}}


def run_recovery(config: Config, out: Path) -> dict:
    """Damage the teacher once per `--recovery-kinds` and recover each damaged model with KL and KL+CKA
    (same budget and seed), then one recovery report over every run (the CKA-recovery correlation).

    CPU defaults (measured 2026-12-02: 4 min 29 s on 2 idle cores, 505 CPU-s, 4.8 GB peak): 8 steps x 4 x 128 tokens
    per run, lr 1e-4, held-out evaluation of 8 blocks every 2 steps. The forgetting fine-tunes on a built-in
    arithmetic-tables corpus (`damage.forget.arithmetic_corpus`, written to OUT/forget_corpus.txt) at lr 3e-4
    until the general held-out perplexity has risen by half (at most 30 steps)."""
    kinds = [k.strip() for k in config.recovery_kinds.split(",") if k.strip()]
    if not kinds:
        raise ConfigError("--recovery-kinds must name at least one damage kind")
    for kind in kinds:
        DAMAGE_KINDS.check(kind)
    started = time.perf_counter()
    loaded = load_model(config.teacher, device=config.device)
    device = next(loaded.model.parameters()).device
    gpu = device.type == "cuda"
    steps = config.steps or (200 if gpu else 8)
    train = TrainConfig(steps=steps, lr=config.lr or (1e-5 if gpu else 1e-4), batch_size=config.batch_size or
                        (16 if gpu else 4), cka_tokens=config.cka_tokens, eval_every=max(steps // 3, 1),
                        eval_blocks=8, seed=config.seed, warmup_steps=max(steps // 20, 1))
    data = DataConfig(data=config.data, seq_len=config.seq_len or (512 if gpu else 128))
    corpus = out / "forget_corpus.txt"
    forget = ForgetConfig(forget_data=str(corpus), forget_steps=30, forget_lr=3e-4, forget_eval_every=5,
                          forget_rise=0.5, forget_batch_size=train.batch_size)
    study = recover.plan_study(out, config.teacher, kinds, list(RECOVERY_LOSSES), train, data, forget, config.device,
                               RECOVERY_DAMAGE)
    valid = train.batch_size * (data.seq_len - train.n_sink)
    if train.cka_tokens > valid:
        raise ConfigError(f"--cka-tokens {train.cka_tokens} is larger than the {valid} valid tokens of a step")
    out.mkdir(parents=True, exist_ok=True)
    if "forget" in kinds:
        corpus.write_text(arithmetic_corpus())
    print(f"recovery demo on {device}: damage {', '.join(kinds)}; recover with {' and '.join(RECOVERY_LOSSES)}, "
          f"{steps} steps x {train.batch_size} x {data.seq_len} tokens, lr {train.lr}")
    runs, damages = recover.run_study(study, loaded, out, {"teacher": config.teacher, "device": str(device),
                                                          "steps": steps, "kinds": kinds})
    print(f"wrote {out}/recovery.md and recovery.html ({time.perf_counter() - started:.0f} s)")
    return {"runs": runs, "damages": damages, "runtime_s": time.perf_counter() - started}
