"""Tests for train/optimizers.py: `--optimizer adamw-bf16` is torch's AdamW with bf16 moments (bit for bit at
step 1, within the moments' rounding after), and allocates the bytes the planner counts."""

from __future__ import annotations

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.parallel.fsdp import optimizer_local_bytes
from ckaqad.parallel.memory import LlamaShape, plan_memory
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student
from ckaqad.train.optimizers import AdamWBF16Moments, build_optimizer
from ckaqad.train.trainer import TrainConfig, make_optimizer


def _pair(weight_decay: float):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 48, generator=g)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=False)
    ours = AdamWBF16Moments([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay)
    grads = [torch.randn(64, 48, generator=g) for _ in range(5)]
    return a, b, ref, ours, grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bf16_moments_are_torch_adamw_rounded(weight_decay):
    a, b, ref, ours, grads = _pair(weight_decay)
    start = a.detach().clone()
    for step, grad in enumerate(grads):
        a.grad, b.grad = grad.clone(), grad.clone()
        ref.step()
        ours.step()
        if step == 0:  # the first step reads no stored moment: the same float32 operations
            assert torch.equal(a, b)
    state = ours.state[b]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # later steps: the moments' bf16 rounding (2^-9 relative) moves each update by well under 1 %
    a, b = a.detach(), b.detach()
    moved = (a - start).abs()
    assert float((a - b).abs().max()) <= 1e-2 * float(moved.max())
    assert not torch.equal(a, b)  # the rounding is real: the optimizer is not AdamW under another name


def test_optimizer_bytes_are_what_the_planner_counts(tiny_model):
    student, _ = build_ptq_student(tiny_model, QuantConfig(scheme="w4a16"), None)
    shape = LlamaShape.from_config(student.config.to_dict(), "tiny")
    for name in ("adamw", "adamw-bf16"):
        optimizer, _ = make_optimizer(student, TrainConfig(optimizer=name))
        for p in student.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        optimizer.step()
        assert optimizer_local_bytes(optimizer) == plan_memory(shape, 1, 1, 8, False, optimizer=name).optimizer
        optimizer.zero_grad(set_to_none=True)
    fp32 = plan_memory(shape, 1, 1, 8, False).optimizer
    assert plan_memory(shape, 1, 1, 8, False, optimizer="adamw-bf16").optimizer < 0.51 * fp32


def test_an_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="optimizer"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, (0.9, 0.95), False)
