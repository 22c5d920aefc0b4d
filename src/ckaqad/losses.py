"""The CKA-QAD objective (METHOD.md §5):  L = L_KL + λ · mean_l (1 − CKA_l).

* L_KL: forward KL(teacher ‖ student) per token at temperature T (scaled by T², Hinton et al.), over the
  full vocabulary or the teacher's top-k (renormalised; optionally with a tail bucket holding the rest of
  the mass). Computed in chunks of tokens by a custom autograd function that produces the gradient chunk
  by chunk in the forward pass, so FP32 logits of the whole batch never exist: only the logits'
  own-dtype gradient is kept.
* L_CKA: mean over the chosen layers of 1 − linear CKA between student and teacher hidden states at the
  sampled token rows, in FP32 with autocast off.
* λ: fixed, or `auto`: λ_t = α · stopgrad(L_KL / L_CKA), so the CKA term keeps a fixed share of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ckaqad.cka import linear_cka
from ckaqad.errors import ConfigError, unknown_name

LOSSES = ("kl", "kl+cka", "cka")
DEFAULT_CHUNK_TOKENS = 1024


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
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean KL(teacher ‖ student) per token over `mask` (default all), differentiable w.r.t. the student.

    Logits (..., V) in any dtype; token dims are flattened. Equal to the mean of `kl_per_token`.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ConfigError(f"teacher and student vocabularies differ ({teacher_logits.shape[-1]} vs {vocab})")
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab).detach()
    weights = torch.ones(student.shape[0], device=student.device) if mask is None else \
        mask.reshape(-1).to(torch.float32)
    count = weights.sum().clamp_min(1.0)
    total = _ChunkedKL.apply(student, teacher, weights / count, temperature, topk, tail, chunk_tokens)
    return total


def cka_term(student_states: dict[int, torch.Tensor], teacher_states: dict[int, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[int, float]]:
    """mean_l (1 − CKA_l) over the layers in `student_states`, and each layer's CKA as a float.

    Runs in float32 with autocast off: bf16 Gram products lose the 1e-3 differences CKA-QAD cares about.
    """
    if not student_states:
        raise ConfigError("the CKA term needs at least one layer")
    device_type = next(iter(student_states.values())).device.type
    values = {}
    with torch.autocast(device_type=device_type, enabled=False):
        for layer, x in student_states.items():
            values[layer] = linear_cka(x.float(), teacher_states[layer].float())
    term = torch.stack([1.0 - v for v in values.values()]).mean()
    return term, {k: float(v.detach()) for k, v in values.items()}


@dataclass
class LossConfig:
    loss: str = "kl+cka"
    """objective: kl (KL-only QAD), kl+cka (CKA-QAD) or cka (CKA term alone)"""
    cka_weight: str = "auto"
    """λ: a number, or auto (λ = α·KL/CKA each step, detached)"""
    cka_alpha: float = 1.0
    """α of the auto weight: the CKA term's share of the KL term"""
    temperature: float = 1.0
    """KL temperature T"""
    topk: int = 0
    """0 for the full-vocabulary KL, else the teacher's top-k"""
    topk_tail: bool = False
    """with top-k, keep the remaining mass as one tail bucket"""
    ce_weight: float = 0.0
    """weight of cross-entropy on the data's next tokens (QAT-style mix), 0 for pure distillation"""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise unknown_name("loss (--loss)", self.loss, LOSSES)
        if self.cka_weight != "auto":
            try:
                weight = float(self.cka_weight)
            except ValueError as exc:
                raise ConfigError(f"--cka-weight must be 'auto' or a number, got {self.cka_weight!r}") from exc
            if weight < 0:
                raise ConfigError(f"--cka-weight must be non-negative, got {weight}")
            self.cka_weight = str(weight)
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.topk < 0:
            raise ConfigError(f"--topk must be 0 (full vocabulary) or positive, got {self.topk}")

    @property
    def uses_cka(self) -> bool:
        return self.loss in ("kl+cka", "cka")

    @property
    def uses_kl(self) -> bool:
        return self.loss in ("kl", "kl+cka")


def combine(kl: torch.Tensor | None, cka: torch.Tensor | None, config: LossConfig) -> tuple[torch.Tensor, float]:
    """Total loss and the λ used (0 when there is no CKA term)."""
    if cka is None:
        return kl, 0.0
    if kl is None:
        return cka, 1.0
    if config.cka_weight == "auto":
        lam = config.cka_alpha * float(kl.detach() / cka.detach().clamp_min(1e-12))
    else:
        lam = float(config.cka_weight)
    return kl + lam * cka, lam


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (float32) and the number of predicted tokens, chunked over rows."""
    vocab = logits.shape[-1]
    pred = logits[:, :-1].reshape(-1, vocab)
    target = input_ids[:, 1:].reshape(-1)
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].reshape(-1).bool()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, pred.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        nll = F.cross_entropy(pred[sl].float(), target[sl], reduction="none")
        total = total + (nll * valid[sl]).sum()
    return total, int(valid.sum())
