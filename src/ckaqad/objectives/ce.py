"""Cross-entropy on the data's next tokens: a QAT-style term mixed into distillation (`--ce-weight`), and
the next-token NLL that perplexities are computed from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ckaqad.errors import ConfigError
from ckaqad.objectives.base import DEFAULT_CHUNK_TOKENS, ForwardOutputs, register_objective
from ckaqad.objectives.ranks import distributed, global_count, sum_over_ranks


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


@dataclass
class CEConfig:
    ce_weight: float = 0.0
    """weight of cross-entropy on the data's next tokens (QAT-style mix), 0 for pure distillation"""

    def __post_init__(self) -> None:
        if self.ce_weight < 0:
            raise ConfigError(f"--ce-weight must be non-negative, got {self.ce_weight}")


@register_objective("ce", CEConfig)
class CEObjective:
    """Mean next-token cross-entropy of the student on the micro-batch (its weight is `--ce-weight`)."""

    needs_states = False
    metric = "ce"
    weight_metric = None

    def __init__(self, config: CEConfig) -> None:
        self.config = config

    def __call__(self, out: ForwardOutputs) -> torch.Tensor:
        nll, count = next_token_nll(out.student_logits, out.batch["input_ids"], out.batch.get("attention_mask"))
        if not distributed():
            return nll / max(count, 1)
        total = global_count(torch.tensor(float(count), device=nll.device))
        return sum_over_ranks(nll / total.clamp_min(1.0))

    def weight(self, value: torch.Tensor, first: torch.Tensor) -> float:
        return self.config.ce_weight
