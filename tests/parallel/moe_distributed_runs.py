"""Settings shared by tests/parallel/test_moe_distributed.py and moe_worker.py: a tiny qwen3_moe teacher (7
experts) and a 2-step kl+cka W4A4 distill run (global batch 4, calibration in 2 batches of 2 blocks, the final
held-out evaluation in 3 batches of 4 blocks: sharded over 2 ranks, routing drift included)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest's tokenizer, moe_helpers
sys.path.insert(0, str(HERE.parent / "commands"))  # the distill tests' corpus

from conftest import make_tiny_tokenizer  # noqa: E402
from moe_helpers import tiny_config  # noqa: E402
from test_distill_command import SEQ_LEN, corpus_text  # noqa: E402

from ckaqad.commands import distill  # noqa: E402
from ckaqad.data.blocks import DataConfig  # noqa: E402
from ckaqad.objectives.compose import ObjectiveConfig  # noqa: E402
from ckaqad.quant.linear import QuantConfig  # noqa: E402
from ckaqad.train.checkpointer import CheckpointConfig  # noqa: E402
from ckaqad.train.trainer import TrainConfig  # noqa: E402

STEPS = 2


def make_workdir(root: Path) -> Path:
    """The teacher saved by save_pretrained, per expert as hub MoE checkpoints are, with 7 experts: FSDP2 splits
    them unevenly (4 + 3 rows per rank), which each rank's per-expert read of the meta build must follow."""
    import torch
    import transformers

    config = tiny_config("qwen3_moe")
    config.num_experts = 7
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(root / "teacher")
    make_tiny_tokenizer().save_pretrained(root / "teacher")
    (root / "data.txt").write_text(corpus_text())
    return root


def config(root: Path, out: Path) -> distill.Config:
    return distill.Config(
        teacher=str(root / "teacher"), device="cpu", out=str(out),
        train=TrainConfig(steps=STEPS, lr=1e-4, warmup_steps=0, batch_size=4, cka_tokens=48, eval_every=0,
                          eval_blocks=12, seed=0, progress=False),
        objective=ObjectiveConfig(loss="kl+cka"), quant=QuantConfig(calib_batch_size=2, calib_batches=2),
        data=DataConfig(data=str(root / "data.txt"), seq_len=SEQ_LEN),
        checkpoint=CheckpointConfig(save_every=STEPS, keep_last=1))
