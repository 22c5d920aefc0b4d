"""The GRPO / ABC-GRPO loop: per step, sample problems → a group of completions per problem (the policy as it
is, `π_old`) → rewards → group-normalised advantages → `epochs` × `minibatches` optimizer steps on the clipped
token objective (+ β·KL to the reference) → log → checkpoint → held-out evaluation.

Why our own loop and not TRL's `GRPOTrainer` (trl 1.16 installs beside our pins): its objective is fixed
inside the 250-line private `_compute_loss`, so ABC's four bounds mean copying that method, and its
checkpoints are the HF Trainer's pickled optimizer/RNG files. Here the objective is one function
(`objectives.py`), checkpoints and metrics are the project's (`train/checkpointer.py`, `train/metrics.py`:
safetensors + JSON, COMPLETE marker, bit-exact resume), and the result is an ordinary HF model directory.

With one update per rollout (--epochs 1 --minibatches 1) the ratio is exactly 1 (π_θ = π_old) and GRPO and
ABC-GRPO take the same step; they differ only from the second update on a rollout, where r has moved from 1.
The default, two minibatches of one pass, is the cheapest setting in which they differ (TRL's
`steps_per_generation`): on CPU each update costs a forward and a backward, π_old's pass a forward only.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ckaqad.errors import ConfigError, TrainingError
from ckaqad.paths import RunDir
from ckaqad.registry import Registry
from ckaqad.rl.objectives import (
    QUADRANTS,
    ClipBounds,
    abc_token_objective,
    clip_statistics,
    group_advantages,
    grpo_token_objective,
)
from ckaqad.rl.rollout import Rollout, completion_logprobs, decode_completions, generate, token_logprobs
from ckaqad.rl.task import Task
from ckaqad.train.checkpointer import CheckpointConfig, CheckpointManager
from ckaqad.train.metrics import MetricsLog

ALGOS = Registry[str]("RL algorithm", flag="--algo")
ALGOS.register("grpo", "GRPO: min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)")
ALGOS.register("abc-grpo", "ABC-GRPO: clip(r, 1−ε₂, 1+ε₁)·A for A>0, clip(r, 1−ε₄, 1+ε₃)·A for A≤0")

AGGREGATIONS = ("sequence", "token")


@dataclass
class RLConfig:
    algo: str = "abc-grpo"
    """grpo or abc-grpo"""
    steps: int = 8
    """RL steps (each: one rollout, then --epochs x --minibatches optimizer steps)"""
    prompts_per_step: int = 2
    """problems per rollout"""
    group_size: int = 4
    """completions per problem (the GRPO group)"""
    epochs: int = 1
    """passes over each rollout (μ)"""
    minibatches: int = 2
    """optimizer steps per pass, each on a slice of the rollout (epochs = minibatches = 1: GRPO = ABC-GRPO)"""
    lr: float = 2e-5
    """AdamW learning rate (constant after warmup)"""
    warmup_steps: int = 0
    """RL steps of linear learning-rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables)"""
    beta: float = 0.0
    """weight of the KL penalty to the reference model (k3 estimator); the KL is logged either way"""
    eps_low: float = 0.2
    """GRPO: lower clip, r ≥ 1 − eps_low"""
    eps_high: float = 0.2
    """GRPO: upper clip, r ≤ 1 + eps_high"""
    eps1: float = 0.2
    """ABC-GRPO, A > 0: r ≤ 1 + eps1"""
    eps2: float = 0.2
    """ABC-GRPO, A > 0: r ≥ 1 − eps2"""
    eps3: float = 0.2
    """ABC-GRPO, A ≤ 0: r ≤ 1 + eps3"""
    eps4: float = 0.2
    """ABC-GRPO, A ≤ 0: r ≥ 1 − eps4"""
    skip_zero_advantage: bool = True
    """skip a minibatch step whose advantages are all 0 (no gradient, but AdamW momentum would move the weights)"""
    aggregation: str = "sequence"
    """sequence (GRPO: mean per completion, then over completions) or token (DAPO: one mean over all tokens)"""
    temperature: float = 1.0
    """sampling temperature (no top-k / top-p, so the ratio is the sampling policy's)"""
    max_new_tokens: int | None = None
    """completion budget (default: the task's)"""
    eval_every: int = 4
    """held-out greedy evaluation every N steps, and at step 0 and the end (0: only at 0 and the end)"""
    eval_at_start: bool = True
    """evaluate the model before the first step (the same for every seed of one model: one run suffices)"""
    eval_problems: int = 32
    """held-out problems per evaluation (the first N of the task's held-out split)"""
    seed: int = 0
    """seed of the problem draws, the sampling and the initial RNG"""
    progress: bool = True
    """print one line per step"""

    def __post_init__(self) -> None:
        ALGOS.check(self.algo)
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation {self.aggregation!r}: choose from {', '.join(AGGREGATIONS)}")
        for name in ("steps", "prompts_per_step", "epochs", "minibatches", "eval_problems"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be at least 2 (a group normalises its rewards), got "
                              f"{self.group_size}")
        if self.minibatches > self.prompts_per_step * self.group_size:
            raise ConfigError(f"--minibatches {self.minibatches} is more than the "
                              f"{self.prompts_per_step * self.group_size} completions of a rollout")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        for name in ("weight_decay", "max_grad_norm", "beta", "eps_low", "eps_high", "eps1", "eps2", "eps3",
                     "eps4"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")

    @property
    def bounds(self) -> ClipBounds:
        if self.algo == "grpo":
            return ClipBounds.grpo(self.eps_low, self.eps_high)
        return ClipBounds(self.eps1, self.eps2, self.eps3, self.eps4)

    def token_objective(self, ratio: Tensor, advantages: Tensor) -> Tensor:
        if self.algo == "grpo":
            return grpo_token_objective(ratio, advantages, self.eps_low, self.eps_high)
        return abc_token_objective(ratio, advantages, self.eps1, self.eps2, self.eps3, self.eps4)


def aggregate(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """Masked mean of per-token values: per completion then over completions (`sequence`), or over all tokens
    at once (`token`)."""
    mask = mask.to(values.dtype)
    if how == "sequence":
        return ((values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    return (values * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π_θ‖π_ref) estimate on π_θ's samples, k3 = e^{ref−logp} − (ref−logp) − 1 ≥ 0 (GRPO's)."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1


@dataclass
class Policy:
    """What the loop trains and reads: the policy, the frozen reference, the task, the optimizer."""

    config: RLConfig
    model: nn.Module
    reference: nn.Module
    tokenizer: object
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    run: RunDir
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    start_step: int = 0

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens or self.task.max_new_tokens


def make_optimizer(model: nn.Module, config: RLConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (β 0.9, 0.99) with a linear warmup to a constant rate, stepped once per RL step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return optimizer, scheduler


def rollout_step(policy: Policy, step: int) -> tuple[Rollout, Tensor, Tensor, list[str]]:
    """(rollout, rewards, advantages, completions) of one step's groups."""
    cfg = policy.config
    problems = policy.task.train_problems(cfg.seed, step, cfg.prompts_per_step)
    prompts = [policy.task.prompt_ids(p, policy.tokenizer) for p in problems for _ in range(cfg.group_size)]
    policy.model.eval()
    rollout = generate(policy.model, policy.tokenizer, prompts, policy.max_new_tokens, cfg.temperature)
    texts = decode_completions(policy.tokenizer, rollout)
    owners = [p for p in problems for _ in range(cfg.group_size)]
    rewards = torch.tensor([policy.task.reward(p, t) for p, t in zip(owners, texts, strict=True)])
    return rollout, rewards, group_advantages(rewards, cfg.group_size), texts


def update(policy: Policy, rollout: Rollout, advantages: Tensor, old_logp: Tensor,
           ref_logp: Tensor | None) -> dict[str, Tensor]:
    """One optimizer step on (a minibatch of) the rollout; its logged tensors."""
    cfg = policy.config
    mask = rollout.completion_mask
    logp, _ = token_logprobs(policy.model, rollout, cfg.temperature)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.device)
    loss = -aggregate(cfg.token_objective(ratio, adv), mask, cfg.aggregation)
    stats = {}
    if ref_logp is not None:
        kl = aggregate(k3_kl(logp, ref_logp), mask, cfg.aggregation)
        loss = loss + cfg.beta * kl
        stats["kl_ref"] = kl.detach()
    if not torch.isfinite(loss):
        raise TrainingError(f"the RL loss is not finite ({loss.item()}); lower --lr")
    policy.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    policy.optimizer.step()
    stats.update(clip_statistics(ratio.detach(), adv, mask, cfg.bounds, cfg.eps_low, cfg.eps_high))
    stats.update(loss=loss.detach(), grad_norm=norm.detach(), ratio_mean=aggregate(ratio.detach(), mask, "token"))
    return stats


def minibatches(n_rows: int, count: int) -> list[slice]:
    """`count` contiguous, nearly equal slices of the rollout's rows."""
    if count > n_rows:
        raise ConfigError(f"--minibatches {count} is more than the {n_rows} completions of a rollout")
    bounds = [round(i * n_rows / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def train_step(policy: Policy, step: int) -> dict:
    """Rollout; π_old's log-probs and entropy (one no-grad pass); then `epochs` passes of one optimizer step per
    minibatch. The first update sees r = 1 (π_θ = π_old): GRPO and ABC-GRPO differ from the second update on.
    Clip and quadrant statistics are the mean over the updates after the first; `kl_ref` (train) is logged
    when --beta > 0 (the held-out evaluation always logs the exact KL)."""
    cfg = policy.config
    started = time.perf_counter()
    rollout, rewards, advantages, _ = rollout_step(policy, step)
    with torch.no_grad():
        old_logp, entropy = token_logprobs(policy.model, rollout, cfg.temperature, with_entropy=True)
        ref_logp = token_logprobs(policy.reference, rollout, cfg.temperature)[0] if cfg.beta > 0 else None
    per_update, skipped = [], 0
    for _ in range(cfg.epochs):
        for rows in minibatches(rollout.input_ids.shape[0], cfg.minibatches):
            if cfg.skip_zero_advantage and ref_logp is None and not advantages[rows].any():
                skipped += 1  # no signal: an optimizer step would only move the weights by Adam's momentum
                continue
            per_update.append(update(policy, rollout.rows(rows), advantages[rows], old_logp[rows],
                                     None if ref_logp is None else ref_logp[rows]))
    with warnings.catch_warnings():  # the schedule counts RL steps, also those whose updates were all skipped
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        policy.scheduler.step()
    record = {"kind": "train", "step": step + 1, "reward_mean": rewards.mean().item(),
              "reward_std": rewards.std().item(),
              "entropy": aggregate(entropy, rollout.completion_mask, "token").item(),
              "completion_length": rollout.lengths.float().mean().item()}
    if per_update:
        later = per_update[1:] or per_update
        record.update({k: sum(s[k].item() for s in later) / len(later) for k in later[0]
                       if k not in ("loss", "grad_norm")})
        record.update(loss=per_update[0]["loss"].item(), grad_norm=per_update[0]["grad_norm"].item())
    else:  # every minibatch skipped: every token has A = 0, nothing moved
        record.update({f"quadrant_{q}": 0.0 for q in QUADRANTS}, quadrant_zero_adv=1.0, clipped=0.0,
                      grpo_unbounded=0.0, ratio_mean=1.0, loss=0.0, grad_norm=0.0,
                      **{f"clipped_{q}": 0.0 for q in QUADRANTS})
    return {**record, "lr": policy.scheduler.get_last_lr()[0], "updates": len(per_update), "skipped": skipped,
            "seconds": time.perf_counter() - started}


@torch.no_grad()
def evaluate(model: nn.Module, reference: nn.Module, tokenizer, task: Task, limit: int, max_new_tokens: int,
             batch_size: int = 32) -> dict:
    """On the first `limit` held-out problems, greedy: accuracy (mean reward), completion length, and per
    completion token the policy's entropy and its exact KL(π_θ‖π_ref) over the vocabulary."""
    problems = list(task.heldout[:limit])
    rewards, lengths, entropy, kl, tokens = [], [], 0.0, 0.0, 0
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rollout = generate(model, tokenizer, [task.prompt_ids(p, tokenizer) for p in chunk], max_new_tokens,
                           temperature=1.0, greedy=True)
        texts = decode_completions(tokenizer, rollout)
        rewards += [task.reward(p, t) for p, t in zip(chunk, texts, strict=True)]
        lengths += rollout.lengths.tolist()
        logp = completion_logprobs(model, rollout)
        ref_logp = completion_logprobs(reference, rollout)
        mask = rollout.completion_mask.float()
        p = logp.exp()
        entropy += (-(p * logp).sum(-1) * mask).sum().item()
        kl += ((p * (logp - ref_logp)).sum(-1) * mask).sum().item()
        tokens += int(mask.sum().item())
    return {"heldout_accuracy": sum(rewards) / len(rewards), "heldout_length": sum(lengths) / len(lengths),
            "heldout_entropy": entropy / max(tokens, 1), "heldout_kl_ref": kl / max(tokens, 1),
            "heldout_problems": len(problems)}


def train(policy: Policy, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or continue) the loop; the last held-out evaluation. Metrics go to metrics.jsonl and TensorBoard,
    checkpoints to run/checkpoints per --save-every."""
    cfg = policy.config
    log = MetricsLog(policy.run, policy.start_step)
    manager = CheckpointManager(policy.run.root, policy.checkpoint)

    def held_out(step: int) -> dict:
        record = {"kind": "eval", "step": step,
                  **evaluate(policy.model, policy.reference, policy.tokenizer, policy.task, cfg.eval_problems,
                             policy.max_new_tokens)}
        log.write(record)
        if on_step is not None:
            on_step(record)
        return record

    try:
        last = held_out(0) if policy.start_step == 0 and cfg.eval_at_start else None
        for step in range(policy.start_step, cfg.steps):
            record = train_step(policy, step)
            log.write(record)
            if on_step is not None:
                on_step(record)
            done = step + 1
            if manager.should_save(done, cfg.steps):
                manager.save(done, policy.model, policy.optimizer, policy.scheduler)
            if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                last = held_out(done)
    finally:
        log.close()
    return last if last is not None else held_out(cfg.steps)
