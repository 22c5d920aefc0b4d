"""The RL loop on the tiny random Llama: a few GRPO / ABC-GRPO steps raise the reward on a trivially learnable
task; with one update per rollout (ratio ≡ 1) the two algorithms take identical steps."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from ckaqad.paths import RLRunDir
from ckaqad.rl.plots import mean_and_spread
from ckaqad.rl.task import Problem, Task
from ckaqad.rl.trainer import Policy, RLConfig, aggregate, make_optimizer, train
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = set("abcdefghijklmnopqrstuvwxyz")


def letters_task() -> Task:
    """Reward = the fraction of the completion's characters that are lower-case letters (26 of the tiny
    model's 259 tokens, so about 0.1 at the start): learnable by any policy."""
    problems = [Problem(id=str(i), question=f"q{i}:", answer="") for i in range(8)]

    def reward(problem: Problem, completion: str) -> float:
        return sum(c in LETTERS for c in completion) / max(len(completion), 1)

    return Task(name="letters", description="write lower-case letters", sample=lambda rng: rng.choice(problems[:6]),
                heldout=tuple(problems[6:]), prompt_ids=lambda p, tok: list(tok(p.question)["input_ids"]),
                reward=reward, max_new_tokens=4)


def make_policy(model, tokenizer, tmp_path: Path, **overrides) -> Policy:
    config = RLConfig(**{"steps": 12, "prompts_per_step": 2, "group_size": 8, "lr": 2e-2, "eval_every": 0,
                         "eval_problems": 2, "progress": False, **overrides})
    reference = copy.deepcopy(model).requires_grad_(False)
    model.requires_grad_(True)
    optimizer, scheduler = make_optimizer(model, config)
    return Policy(config=config, model=model, reference=reference, tokenizer=tokenizer, task=letters_task(),
                  optimizer=optimizer, scheduler=scheduler, run=RLRunDir(tmp_path),
                  checkpoint=CheckpointConfig(save_every=100, keep_last=1))


@pytest.mark.parametrize("algo", ["grpo", "abc-grpo"])
def test_a_few_steps_raise_the_reward_on_a_learnable_task(tiny_model, tiny_tokenizer, tmp_path, algo):
    torch.manual_seed(0)
    random.seed(0)
    policy = make_policy(tiny_model, tiny_tokenizer, tmp_path, algo=algo, beta=0.01)
    final = train(policy)
    train_records, evals = read_metrics(tmp_path)
    assert len(train_records) == 12 and [e["step"] for e in evals] == [0, 12]
    first = sum(r["reward_mean"] for r in train_records[:3]) / 3
    last = sum(r["reward_mean"] for r in train_records[-3:]) / 3
    assert first < 0.3 and last > first + 0.4
    assert evals[0]["heldout_accuracy"] < 0.5 and final["heldout_accuracy"] > 0.75
    assert evals[0]["heldout_kl_ref"] == 0 and final["heldout_kl_ref"] > 0.01
    assert train_records[-1]["kl_ref"] > train_records[0]["kl_ref"]
    for record in train_records:
        parts = [record[f"quadrant_{q}"] for q in ("pos_up", "pos_down", "neg_up", "neg_down", "zero_adv")]
        assert sum(parts) == pytest.approx(1.0)
        assert 0 <= record["clipped"] <= 1 and record["entropy"] > 0 and record["completion_length"] > 0


def test_with_one_update_per_rollout_grpo_and_abc_take_the_same_steps(tiny_model_factory, tiny_tokenizer,
                                                                      tmp_path):
    weights = {}
    for algo in ("grpo", "abc-grpo"):
        torch.manual_seed(0)
        policy = make_policy(tiny_model_factory(0), tiny_tokenizer, tmp_path / algo, algo=algo, steps=3,
                             epochs=1, minibatches=1, eps1=0.05, eps2=0.05, eps3=0.05, eps4=0.05)
        train(policy)
        weights[algo] = policy.model.state_dict()
        assert all(r["clipped"] == 0 and r["ratio_mean"] == 1 for r in read_metrics(tmp_path / algo)[0])
    assert all(torch.equal(weights["grpo"][k], weights["abc-grpo"][k]) for k in weights["grpo"])


def test_aggregations():
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(values, mask, "sequence").item() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate(values, mask, "token").item() == pytest.approx(6.0 / 3)


def test_minibatches_without_signal_are_skipped(tiny_model, tiny_tokenizer, tmp_path):
    """Equal rewards in every group: A = 0 everywhere, so with --skip-zero-advantage no optimizer step is taken
    and the weights stay exactly as they were."""
    task = letters_task()
    constant = Task(name="constant", description="always right", sample=task.sample, heldout=task.heldout,
                    prompt_ids=task.prompt_ids, reward=lambda problem, completion: 1.0, max_new_tokens=4)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    policy = make_policy(tiny_model, tiny_tokenizer, tmp_path, steps=2, skip_zero_advantage=True)
    policy = Policy(**{**policy.__dict__, "task": constant})
    train(policy)
    records = read_metrics(tmp_path)[0]
    assert [(r["updates"], r["skipped"], r["quadrant_zero_adv"]) for r in records] == [(0, 2, 1.0)] * 2
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_mean_and_spread_over_seeds():
    rows = mean_and_spread([[(0, 0.5), (5, 0.0)], [(5, 0.2)], [(5, 0.4)]])
    assert rows == [(0, 0.5, 0.5, 0.5), (5, pytest.approx(0.2), 0.0, 0.4)]
