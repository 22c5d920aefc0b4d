"""Forgetting: fine-tune a model with cross-entropy on a narrow corpus until its general ability drops.

The loop is plain next-token CE (no teacher, so not the distillation trainer): AdamW with the trainer's
warmup-cosine schedule over `--forget-steps`, batches drawn from the narrow corpus's training blocks in the
trainer's (seed, step) order. Every `--forget-eval-every` steps the general held-out perplexity is measured;
the run stops early once it has risen by `--forget-rise` (relative) over the starting model's. The history
gives narrow and general perplexity at every evaluation, before and after.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ckaqad.data.blocks import eval_batches, train_batches
from ckaqad.errors import ConfigError, TrainingError
from ckaqad.objectives.ce import next_token_nll
from ckaqad.train.trainer import TrainConfig, autocast, make_optimizer


@dataclass
class ForgetConfig:
    forget_data: str | None = None
    """the narrow corpus of --kind forget (a local .txt/.jsonl file or directory)"""
    forget_steps: int = 50
    """most CE fine-tuning steps on the narrow corpus"""
    forget_lr: float = 1e-4
    """peak learning rate of the forgetting fine-tune"""
    forget_batch_size: int = 4
    """narrow blocks per forgetting step"""
    forget_eval_every: int = 10
    """measure general held-out perplexity every N forgetting steps"""
    forget_rise: float = 0.25
    """stop once general held-out perplexity has risen by this fraction (0: run every step)"""

    def __post_init__(self) -> None:
        if self.forget_steps < 1 or self.forget_batch_size < 1 or self.forget_eval_every < 1:
            raise ConfigError("--forget-steps, --forget-batch-size and --forget-eval-every must be at least 1")
        if self.forget_lr <= 0 or self.forget_rise < 0:
            raise ConfigError("--forget-lr must be positive and --forget-rise non-negative")


@dataclass
class ForgetReport:
    steps: int
    stopped_early: bool
    risen: bool
    start: dict
    end: dict
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) of `model` over `batches`."""
    total, count = 0.0, 0
    for batch in batches:
        device = next(model.parameters()).device
        with autocast(device):
            logits = model(**batch).logits
        nll, n = next_token_nll(logits, batch["input_ids"], batch.get("attention_mask"))
        total, count = total + float(nll), count + n
    return math.exp(total / max(count, 1))


def forget_finetune(model: nn.Module, narrow_train: torch.Tensor, narrow_heldout: torch.Tensor,
                    general_heldout: torch.Tensor, config: ForgetConfig, eval_blocks: int, seed: int = 0
                    ) -> ForgetReport:
    """Fine-tune `model` in place on `narrow_train` blocks; returns narrow/general perplexities over time."""
    device = next(model.parameters()).device
    train = TrainConfig(steps=config.forget_steps, lr=config.forget_lr, batch_size=config.forget_batch_size,
                        warmup_steps=min(5, config.forget_steps // 10), seed=seed, progress=False)
    model.requires_grad_(True)
    optimizer, scheduler = make_optimizer(model, train)

    def measure(step: int) -> dict:
        model.eval()
        row = {"step": step,
               "general_perplexity": perplexity(model, eval_batches(general_heldout, config.forget_batch_size,
                                                                    device, limit=eval_blocks)),
               "narrow_perplexity": perplexity(model, eval_batches(narrow_heldout, config.forget_batch_size,
                                                                   device, limit=eval_blocks))}
        model.train()
        return row

    history = [measure(0)]
    start = history[0]
    batches = train_batches(narrow_train, config.forget_batch_size, seed, device=device)
    stopped = False
    step = 0
    model.train()
    for step in range(1, config.forget_steps + 1):
        batch = next(batches)
        with autocast(device):
            logits = model(**batch).logits
        nll, count = next_token_nll(logits, batch["input_ids"], batch["attention_mask"])
        loss = nll / max(count, 1)
        if not torch.isfinite(loss):
            raise TrainingError(f"the forgetting loss was not finite at step {step}; lower --forget-lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % config.forget_eval_every == 0 or step == config.forget_steps:
            row = measure(step)
            row["train_ce"] = float(loss.detach())
            history.append(row)
            target = start["general_perplexity"] * (1 + config.forget_rise)
            if config.forget_rise and row["general_perplexity"] >= target:
                stopped = step < config.forget_steps
                break
    model.requires_grad_(False).eval()
    end = history[-1]
    risen = end["general_perplexity"] > start["general_perplexity"]
    return ForgetReport(steps=step, stopped_early=stopped, risen=risen, start=start, end=end, history=history)


def arithmetic_corpus(n_documents: int = 400) -> str:
    """A narrow corpus that needs no download: multiplication and addition tables written out in words and
    digits, one table a document (blank-line separated). The recovery demo forgets on it."""
    docs = []
    for d in range(n_documents):
        a = 2 + d % 97
        op = "+" if d % 3 == 0 else "×"
        lines = [f"{a} {op} {b} = {a + b if op == '+' else a * b}" for b in range(1, 13)]
        docs.append(f"Table {d + 1}: {'addition' if op == '+' else 'multiplication'} by {a}.\n" + "\n".join(lines))
    return "\n\n".join(docs) + "\n"
