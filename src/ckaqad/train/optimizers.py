"""The optimizers `--optimizer` names: `adamw` (torch's AdamW, FP32 moments: 8 bytes per trained parameter) and
`adamw-bf16` (the same update with both moments stored in bf16: 4 bytes per trained parameter).

Why bf16 moments and not torchao's 8-bit or 4-bit AdamW (docs/distributed.md#memory-lean-training-state):
torchao 0.18 installs from PyPI for torch 2.13 CPU, but every step of its low-bit optimizers is a
`torch.compile`d function per parameter shape (38 s for the first step of one 512 x 256 tensor on this
machine's CPU) and its import loads CUDA kernels it cannot find. The moments of a QAD run are a third of the
FP32 training state; halving them is what the planner needs to move a layout across a limit, and the
FP32-master update below is torch's AdamW's arithmetic, read back from bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ckaqad.registry import unknown_name

OPTIMIZERS = ("adamw", "adamw-bf16")


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW with `exp_avg` and `exp_avg_sq` stored in bf16 and the update computed in FP32.

    Each step reads the moments into FP32, updates them exactly as `torch.optim.AdamW` (single-tensor path)
    does, takes the step from those FP32 values, then stores them rounded to bf16 (round to nearest even).
    So the first step equals torch's AdamW bit for bit, and later steps differ by the moments' bf16 rounding
    (relative 2^-9). Works on DTensor shards (FSDP2): every operation is elementwise.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad
                exp_avg = state["exp_avg"].to(torch.float32).lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].to(torch.float32).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.mul_(1 - lr * group["weight_decay"])
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
        return loss


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float], fused: bool) -> torch.optim.Optimizer:
    """The optimizer `--optimizer NAME` names over `params`."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
    if name == "adamw-bf16":
        return AdamWBF16Moments(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise unknown_name("optimizer (--optimizer)", name, OPTIMIZERS)
