"""`ckaqad rl`: RL post-training of a model with GRPO or ABC-GRPO on a task with a verifiable reward
(`--task arithmetic | code`), offline, with generation by transformers (CPU or GPU).

The run directory (paths.RLRunDir) holds config.yaml, metrics.jsonl (reward, held-out accuracy, entropy,
quadrant and clip fractions, KL to the reference, completion length), TensorBoard, checkpoints (resume with
`--resume RUN`), rl_curves.png, summary.json and `model/`: an ordinary HF model directory that diagnose,
distill and eval take as `--teacher RUN/model`. Nothing is written before every input has been checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ckaqad.commands.distill import flat_fields
from ckaqad.errors import CheckpointError, ConfigError
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.models.load import load_model, resolve_device
from ckaqad.paths import RLRunDir
from ckaqad.rl.plots import plot_runs
from ckaqad.rl.tasks import TASKS
from ckaqad.rl.trainer import Policy, RLConfig, make_optimizer, train
from ckaqad.train.checkpointer import CheckpointConfig, CheckpointManager

HELP = "RL post-training with GRPO or ABC-GRPO on a verifiable task (arithmetic, code); the result is an HF model"

# Fields that may differ between a run and its resumption.
RESUME_MAY_CHANGE = {"resume", "out", "device", "progress", "steps", "eval_every"}


@dataclass
class Config:
    model: str = "default"
    """model to post-train: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
    task: str = "arithmetic"
    """arithmetic (generated word problems) or code (small functions run against tests in the sandbox)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/rl"
    """run directory"""
    resume: str | None = None
    """continue the run in this directory from its newest checkpoint"""
    rl: RLConfig = field(default_factory=RLConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        TASKS.check(self.task)


def check_resume(run: RLRunDir, current: dict) -> None:
    if not run.root.is_dir():
        raise CheckpointError(f"--resume {run.root}: no such run directory")
    if not run.config.is_file():
        raise CheckpointError(f"--resume {run.root}: not a run directory (no {run.CONFIG})")
    saved = yaml.safe_load(run.config.read_text()) or {}
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:4])
        raise CheckpointError(f"--resume {run.root}: the config differs from the run's ({details})")
    if run.latest_checkpoint() is None:
        raise CheckpointError(f"--resume {run.root}: the run has no complete checkpoint")


def run_dir_of(config: Config) -> RLRunDir:
    run = RLRunDir(Path(config.resume or config.out).expanduser())
    if config.resume:
        check_resume(run, flat_fields(config))
    else:
        check_writable(run.root)
        if run.root.exists() and any(run.root.iterdir()):
            raise ConfigError(f"--out {run.root} exists and is not empty; choose another or continue it with --resume")
    return run


def build_policy(config: Config) -> Policy:
    """Validate, load policy and reference (float32), create the optimizer, restore a checkpoint on resume.
    Nothing is written here."""
    run = run_dir_of(config)
    task = TASKS.get(config.task)
    if config.rl.eval_problems > len(task.heldout):
        raise ConfigError(f"--eval-problems {config.rl.eval_problems}: task {task.name!r} holds "
                          f"{len(task.heldout)} held-out problems")
    device = resolve_device(config.device)
    torch.manual_seed(config.rl.seed)
    reference = load_model(config.model, device=device, dtype=torch.float32)
    model = load_model(reference.model_dir, device=device, dtype=torch.float32).model.requires_grad_(True)
    optimizer, scheduler = make_optimizer(model, config.rl)
    policy = Policy(config=config.rl, model=model, reference=reference.model, tokenizer=reference.tokenizer,
                    task=task, optimizer=optimizer, scheduler=scheduler, run=run, checkpoint=config.checkpoint)
    if config.resume:
        state = CheckpointManager(run.root, config.checkpoint).load(model, optimizer, scheduler)
        policy.start_step = state["step"]
    return policy


def save_model(policy: Policy, config: Config, final: dict) -> None:
    """The trained policy as an ordinary HF model directory (safetensors, config, tokenizer)."""
    run = policy.run
    with atomic_directory(run.model) as tmp:
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        meta = {"source": config.model, "algo": config.rl.algo, "task": config.task, "steps": config.rl.steps,
                "seed": config.rl.seed, "heldout_accuracy": final["heldout_accuracy"]}
        (tmp / RLRunDir.RL_META).write_text(json.dumps(meta, indent=2))


def print_record(record: dict) -> None:
    if record["kind"] == "eval":
        print(f"step {record['step']:4d}  held-out accuracy {record['heldout_accuracy']:.3f}  entropy "
              f"{record['heldout_entropy']:.3f}  KL {record['heldout_kl_ref']:.4f}  length "
              f"{record['heldout_length']:.1f}", flush=True)
    else:
        kl = f"  KL {record['kl_ref']:.4f}" if "kl_ref" in record else ""
        print(f"step {record['step']:4d}  reward {record['reward_mean']:.3f} ± {record['reward_std']:.3f}  "
              f"entropy {record['entropy']:.3f}{kl}  clipped {record['clipped']:.3f}  "
              f"length {record['completion_length']:.1f}  ({record['seconds']:.1f} s)", flush=True)


def run(config: Config) -> dict:
    """Build (or resume) and train; write the model, curves and summary.json; return the summary."""
    policy = build_policy(config)
    if policy.start_step == 0:
        policy.run.root.mkdir(parents=True, exist_ok=True)
        write_text(policy.run.config, yaml.safe_dump(flat_fields(config), sort_keys=True))
    final = train(policy, on_step=print_record if config.rl.progress else None)
    save_model(policy, config, final)
    plot_runs({config.rl.algo: [policy.run.root]}, policy.run.curves, title=f"{config.rl.algo} on {config.task}")
    summary = {"final": final, "algo": config.rl.algo, "task": config.task, "steps": config.rl.steps,
               "seed": config.rl.seed, "model": str(policy.run.model)}
    write_json(policy.run.summary, summary)
    if config.rl.progress:
        print(f"{config.rl.algo}: held-out accuracy {final['heldout_accuracy']:.3f} -> {policy.run.model} "
              f"(use it as --teacher {policy.run.model})")
    return summary
