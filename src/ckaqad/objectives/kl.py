"""The logit term of distillation (docs/method.md#cka-qad-loss): forward KL(teacher ‖ student) per token.

At temperature T (scaled by T², Hinton et al.), over the full vocabulary or the teacher's top-k
(renormalised; optionally with a tail bucket holding the rest of the mass). Computed in chunks of tokens by
a custom autograd function that produces the gradient chunk by chunk in the forward pass, so FP32 logits of
the whole batch never exist: only the logits' own-dtype gradient is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import DEFAULT_CHUNK_TOKENS, ForwardOutputs, register_objective
from ckaqad.objectives.ranks import distributed, global_count, sum_over_ranks


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 topk: int = 0, tail: bool = False) -> torch.Tensor:
    """KL(teacher ‖ student) for each row of (n, V) logits, float32 (n,), times T².

    top-k: teacher probabilities over its k largest logits, renormalised (or with a tail bucket for the
    remaining mass: a proper KL over k+1 outcomes); the student keeps its full-vocabulary log-probabilities,
    so mass it puts outside the teacher's top-k is penalised. k >= V equals the full KL.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    if topk and topk < t.shape[-1]:
        log_p_k, index = log_p.topk(topk, dim=-1)
        log_q_k = log_q.gather(-1, index)
        if tail:
            log_p_tail = torch.log1p(-log_p_k.exp().sum(-1).clamp(max=1.0)).clamp_min(-1e4)
            log_q_tail = torch.log1p(-log_q_k.exp().sum(-1).clamp(max=1.0 - 1e-7))
            kl = (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)
        else:
            log_p_k = log_p_k - torch.logsumexp(log_p_k, dim=-1, keepdim=True)
            kl = (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1)
    else:
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return kl * temperature**2


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weights, temperature, topk, tail, chunk):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        for start in range(0, student.shape[0], chunk):
            end = min(start + chunk, student.shape[0])
            w = weights[start:end]
            with torch.enable_grad():
                s = student[start:end].detach().float().requires_grad_(need_grad)
                loss = (kl_per_token(s, teacher[start:end], temperature, topk, tail) * w).sum()
            if need_grad:
                (g,) = torch.autograd.grad(loss, s)
                grad[start:end] = g.to(student.dtype)
            total += loss.detach()
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def chunked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0, topk: int = 0, tail: bool = False,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(teacher ‖ student) per token over `mask` (default all), differentiable w.r.t. the student.

    Logits (..., V) in any dtype; token dims are flattened. Equal to the mean of `kl_per_token`. `count`
    replaces the divisor (the mask's token count): the global batch's count gives this rank's share of the
    global mean.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ConfigError(f"teacher and student vocabularies differ ({teacher_logits.shape[-1]} vs {vocab})")
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab).detach()
    weights = torch.ones(student.shape[0], device=student.device) if mask is None else \
        mask.reshape(-1).to(torch.float32)
    count = weights.sum().clamp_min(1.0) if count is None else count.to(weights.device).clamp_min(1.0)
    total = _ChunkedKL.apply(student, teacher, weights / count, temperature, topk, tail, chunk_tokens)
    return total


@dataclass
class KLConfig:
    temperature: float = 1.0
    """KL temperature T"""
    topk: int = 0
    """0 for the full-vocabulary KL, else the teacher's top-k"""
    topk_tail: bool = False
    """with top-k, keep the remaining mass as one tail bucket"""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.topk < 0:
            raise ConfigError(f"--topk must be 0 (full vocabulary) or positive, got {self.topk}")


@register_objective("kl", KLConfig)
class KLObjective:
    """Mean KL(teacher ‖ student) per real token of the micro-batch."""

    needs_states = False
    metric = "kl"
    weight_metric = None

    def __init__(self, config: KLConfig) -> None:
        self.config = config

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        c = self.config
        mask = out.batch.get("attention_mask")
        if not distributed():
            return chunked_kl(out.student_logits, out.teacher_logits, mask, c.temperature, c.topk, c.topk_tail)
        # Under torchrun: this rank's tokens over the global count of valid tokens (torchtitan's global token
        # normalisation), summed over ranks for the value.
        local = out.student_logits[..., 0].numel() if mask is None else mask.sum()
        count = global_count(torch.as_tensor(local, device=out.student_logits.device))
        return sum_over_ranks(chunked_kl(out.student_logits, out.teacher_logits, mask, c.temperature, c.topk,
                                         c.topk_tail, count=count))

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> float:
        return 1.0
