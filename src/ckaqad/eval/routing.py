"""Routing drift: how a student's MoE routers depart from the teacher's on the same tokens
(docs/moe_export.md#routing-drift). Per MoE layer, over the held-out tokens:

- `jaccard`: mean over tokens of |S ∩ T| / |S ∪ T|, S and T the sets of top-k experts the student and the teacher
  chose (exactly the model's choice: after DeepSeek-style correction bias and grouped top-k);
- `router_kl`: mean KL(teacher ‖ student) between the router distributions (`objectives.router_kl`);
- `teacher_load`, `student_load`: each expert's share of the top-k choices (a histogram summing to 1).

Pure tensor functions, plus `RoutingStats`, the running sums that `eval.fidelity` keeps per student.

>>> a = torch.tensor([[0, 1], [2, 3]])
>>> topk_jaccard(a, torch.tensor([[1, 0], [2, 4]]), 5).tolist()
[1.0, 0.3333333432674408]
"""

from __future__ import annotations

import torch

from ckaqad.capture import RouterStates
from ckaqad.errors import ModelError
from ckaqad.objectives.router_kl import router_kl_per_token


def choice_mask(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, E) bool: which experts each of N tokens chose, from the `(N, k)` indices."""
    mask = torch.zeros(chosen.shape[0], num_experts, dtype=torch.bool, device=chosen.device)
    return mask.scatter_(1, chosen.long(), True)


def topk_jaccard(student_chosen: torch.Tensor, teacher_chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-token Jaccard index `(N,)` float32 of the student's and teacher's chosen experts (`(N, k)` each)."""
    s, t = choice_mask(student_chosen, num_experts), choice_mask(teacher_chosen, num_experts)
    return (s & t).sum(1).float() / (s | t).sum(1).clamp_min(1).float()


def expert_load(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of times each expert was chosen, `(E,)` float64, over the `(N, k)` choices."""
    return torch.bincount(chosen.reshape(-1).long().cpu(), minlength=num_experts).double()


class RoutingStats:
    """Running sums of one student's routing drift, per MoE layer (teacher block index)."""

    def __init__(self) -> None:
        self.jaccard: dict[int, float] = {}
        self.kl: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.teacher_load: dict[int, torch.Tensor] = {}
        self.student_load: dict[int, torch.Tensor] = {}
        self.top_k: dict[int, int] = {}

    def update(self, student: dict[int, RouterStates], teacher: dict[int, RouterStates],
               rows: torch.Tensor | None = None) -> None:
        """Add one batch: router states `{block: RouterStates}` of both models at the same token rows; `rows`
        selects which of those rows count (all by default)."""
        if set(student) != set(teacher):
            raise ModelError(f"student routers {sorted(student)} and teacher routers {sorted(teacher)} differ")
        for index, s in student.items():
            t = teacher[index]
            s_logits, t_logits, s_chosen, t_chosen = s.logits, t.logits, s.chosen, t.chosen
            if rows is not None:
                s_logits, t_logits = s_logits.index_select(0, rows), t_logits.index_select(0, rows)
                s_chosen, t_chosen = s_chosen.index_select(0, rows), t_chosen.index_select(0, rows)
            experts = t_logits.shape[-1]
            if s_logits.shape[-1] != experts:
                raise ModelError(f"block {index}: the student routes over {s_logits.shape[-1]} experts, "
                                 f"the teacher over {experts}")
            jaccard = topk_jaccard(s_chosen, t_chosen, experts).double().sum()
            kl = router_kl_per_token(t_logits, s_logits, t.kind).double().sum()
            self.jaccard[index] = self.jaccard.get(index, 0.0) + float(jaccard)
            self.kl[index] = self.kl.get(index, 0.0) + float(kl)
            self.tokens[index] = self.tokens.get(index, 0) + s_chosen.shape[0]
            self.teacher_load[index] = self.teacher_load.get(index, 0) + expert_load(t_chosen, experts)
            self.student_load[index] = self.student_load.get(index, 0) + expert_load(s_chosen, experts)
            self.top_k[index] = t_chosen.shape[1]

    def merge(self, other: RoutingStats) -> None:
        """Add `other`'s sums (another rank's share of the tokens) to these."""
        for index, tokens in other.tokens.items():
            self.jaccard[index] = self.jaccard.get(index, 0.0) + other.jaccard[index]
            self.kl[index] = self.kl.get(index, 0.0) + other.kl[index]
            self.tokens[index] = self.tokens.get(index, 0) + tokens
            self.teacher_load[index] = self.teacher_load.get(index, 0) + other.teacher_load[index]
            self.student_load[index] = self.student_load.get(index, 0) + other.student_load[index]
            self.top_k[index] = other.top_k[index]

    def rows(self) -> list[dict]:
        """One row per MoE layer: {layer, experts, top_k, tokens, jaccard, router_kl, teacher_load, student_load}
        (loads as shares of all choices)."""
        out = []
        for index in sorted(self.tokens):
            n = max(self.tokens[index], 1)
            t_load, s_load = self.teacher_load[index], self.student_load[index]
            out.append({"layer": index, "experts": len(t_load), "top_k": self.top_k[index],
                        "tokens": self.tokens[index],
                        "jaccard": self.jaccard[index] / n, "router_kl": self.kl[index] / n,
                        "teacher_load": (t_load / t_load.sum().clamp_min(1)).tolist(),
                        "student_load": (s_load / s_load.sum().clamp_min(1)).tolist()})
        return out


def routing_summary(rows: list[dict]) -> dict:
    """Mean Jaccard and router KL over the MoE layers, and the layer of the lowest Jaccard (None / -1 for a
    dense model)."""
    if not rows:
        return {"router_jaccard": None, "router_kl": None, "min_jaccard_layer": -1}
    worst = min(rows, key=lambda r: r["jaccard"])
    return {"router_jaccard": sum(r["jaccard"] for r in rows) / len(rows),
            "router_kl": sum(r["router_kl"] for r in rows) / len(rows), "min_jaccard_layer": worst["layer"]}
