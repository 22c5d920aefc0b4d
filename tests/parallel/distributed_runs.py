"""The settings shared by tests/parallel/test_distributed.py (one process) and distributed_worker.py (the same
runs under torchrun): a tiny teacher, the distill test corpus, and 4-step kl+cka runs with checkpoints at 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest's tiny models
sys.path.insert(0, str(HERE.parent / "commands"))  # the distill tests' corpus

from conftest import save_tiny_teacher  # noqa: E402
from test_distill_command import SEQ_LEN, corpus_text  # noqa: E402

from ckaqad.commands import distill  # noqa: E402
from ckaqad.data.blocks import DataConfig  # noqa: E402
from ckaqad.objectives.compose import ObjectiveConfig  # noqa: E402
from ckaqad.parallel.config import ParallelConfig  # noqa: E402
from ckaqad.quant.linear import QuantConfig  # noqa: E402
from ckaqad.train.checkpointer import CheckpointConfig  # noqa: E402
from ckaqad.train.trainer import TrainConfig  # noqa: E402

STEPS = 4
# Global micro-batch of 4 blocks (2 per rank under 2 processes), 48 CKA rows of the 4 x 31 valid tokens,
# calibration in 4 batches of 2 blocks (2 batches per rank), held-out evaluation in 3 batches of 4 blocks (under 2
# processes rank 0 scores batches 0 and 2, rank 1 batch 1 and runs batch 2 unscored: the sharded evaluation).
TRAIN = dict(steps=STEPS, lr=1e-4, warmup_steps=1, batch_size=4, cka_tokens=48, eval_every=2, eval_blocks=12,
             seed=0, progress=False)
# The student directory written in several files: the tiny student's 0.4 MB in shards of at most 64 KiB.
SMALL_SHARD_BYTES = 64 * 1024


def make_workdir(root: Path) -> Path:
    save_tiny_teacher(root / "teacher")
    (root / "data.txt").write_text(corpus_text())
    return root


def config(root: Path, out: Path, resume: Path | None = None, steps: int = STEPS, save_every: int = 2,
           parallel: ParallelConfig | None = None, dist_timeout: float = 60.0, train: dict | None = None
           ) -> distill.Config:
    parallel = parallel or ParallelConfig(dist_timeout=dist_timeout)
    return distill.Config(
        teacher=str(root / "teacher"), device="cpu", out=str(out), resume=str(resume) if resume else None,
        train=TrainConfig(**{**TRAIN, "steps": steps, **(train or {})}), objective=ObjectiveConfig(loss="kl+cka"),
        quant=QuantConfig(calib_batch_size=2), data=DataConfig(data=str(root / "data.txt"), seq_len=SEQ_LEN),
        checkpoint=CheckpointConfig(save_every=save_every, keep_last=3), parallel=parallel)


def cut_at(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as a run killed after checkpoint `step`: later checkpoints, the final student and the
    summary are gone; metrics.jsonl keeps what a killed run would have logged (the resume drops the rest)."""
    shutil.copytree(run, copy)
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy / "student")
    (copy / "summary.json").unlink()
    return copy


def train_records(run: Path) -> list[dict]:
    keys = ("step", "loss", "kl", "cka_term", "cka_weight", "lr", "grad_norm", "cka_layers")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in keys} for r in lines if r["kind"] == "train"]


def eval_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == "eval"]


# The flags of issue 20's report, scaled to the tiny teacher: one block per rank, the auto CKA weight, no
# evaluation between steps, and the memory-lean state (bf16 AdamW moments; on 2 processes also the student's
# shards offloaded to host memory, which changes where they live, not what is computed).
LEAN = dict(steps=3, batch_size=2, cka_tokens=24, eval_every=0, optimizer="adamw-bf16")
