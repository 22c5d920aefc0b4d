"""tests for ckaqad/eval/routing.py and the routing rows of eval/fidelity.py: top-k Jaccard, router KL and
expert loads on known cases (identical models, a permuted router, a perturbed router)."""

from __future__ import annotations

import copy

import pytest
import torch

from ckaqad.capture import router_modules
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.eval.routing import expert_load, routing_summary, topk_jaccard
from ckaqad.objectives.router_kl import router_kl_per_token
from tests.moe_helpers import make_tiny_moe as tiny_moe


def test_topk_jaccard_golden_values_and_order_invariance():
    teacher = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    student = torch.tensor([[1, 0], [3, 4], [0, 1], [7, 6]])
    assert topk_jaccard(student, teacher, 8).tolist() == [1.0, pytest.approx(1 / 3), 0.0, 1.0]
    assert torch.equal(topk_jaccard(teacher, student, 8), topk_jaccard(student, teacher, 8))


def test_expert_load_counts_every_choice():
    load = expert_load(torch.tensor([[0, 1], [1, 3]]), 5)
    assert load.tolist() == [1.0, 2.0, 0.0, 1.0, 0.0] and load.sum() == 4


def test_routing_summary_of_a_dense_model_is_empty():
    assert routing_summary([]) == {"router_jaccard": None, "router_kl": None, "min_jaccard_layer": -1}


def batches(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 259, (2, 12), generator=g),
             "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3])} for _ in range(n)]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_model_against_itself_agrees_fully(family):
    teacher = tiny_moe(family)
    results, _ = measure_fidelity(teacher, {"same": copy.deepcopy(teacher)}, batches(), progress=False)
    r = results["same"]
    assert [row["layer"] for row in r.routing] == sorted(router_modules(teacher))
    assert r.router_jaccard == 1.0 and r.router_kl == 0.0
    for row in r.routing:
        assert row["teacher_load"] == row["student_load"] and sum(row["teacher_load"]) == pytest.approx(1.0)
        assert row["tokens"] == 2 * (12 + 9)  # real tokens only, padding left out


def test_a_permuted_router_changes_exactly_the_choices_it_swaps():
    """Swapping two rows of the last router swaps those experts in that layer's choices: its loads are the
    teacher's with the two entries swapped, its Jaccard and KL are the directly computed ones, and every earlier
    layer still agrees fully."""
    teacher = tiny_moe("qwen3_moe")
    student = copy.deepcopy(teacher)
    last = max(router_modules(student))
    router = router_modules(student)[last]
    a, b = 0, 5
    with torch.no_grad():
        router.weight[[a, b]] = router.weight[[b, a]].clone()
    data = batches()
    results, _ = measure_fidelity(teacher, {"permuted": student}, data, progress=False)
    rows = {row["layer"]: row for row in results["permuted"].routing}
    for layer, row in rows.items():
        if layer != last:
            assert row["jaccard"] == 1.0 and row["router_kl"] == 0.0
    swapped = list(rows[last]["teacher_load"])
    swapped[a], swapped[b] = swapped[b], swapped[a]
    assert rows[last]["student_load"] == swapped
    # Direct: the teacher's logits with columns a and b swapped are the student's.
    captured = {}
    handle = router_modules(teacher)[last].register_forward_hook(lambda m, i, o: captured.setdefault("l", []).append(o))
    with torch.no_grad():
        for batch in data:
            teacher(**batch)
    handle.remove()
    real = torch.cat([b_["attention_mask"].flatten().bool() for b_ in data])
    t_logits = torch.cat([o[0] for o in captured["l"]])[real]
    t_chosen = torch.cat([o[2] for o in captured["l"]])[real]
    perm = torch.arange(8)
    perm[[a, b]] = perm[[b, a]]
    s_logits, s_chosen = t_logits[:, perm], perm[t_chosen]
    assert rows[last]["jaccard"] == pytest.approx(float(topk_jaccard(s_chosen, t_chosen, 8).double().mean()), abs=1e-12)
    assert rows[last]["router_kl"] == pytest.approx(float(router_kl_per_token(t_logits, s_logits, "softmax")
                                                          .double().mean()), rel=1e-6)
    assert rows[last]["jaccard"] < 1.0 and rows[last]["router_kl"] > 0.0


def test_more_router_noise_means_more_drift():
    teacher = tiny_moe("nemotron_h")
    drift = []
    for scale in (0.01, 0.3):
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            for router in router_modules(student).values():
                router.weight.add_(scale * torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(0)))
        r = measure_fidelity(teacher, {"noisy": student}, batches(), progress=False)[0]["noisy"]
        drift.append((r.router_jaccard, r.router_kl))
    assert drift[0][0] > drift[1][0] and drift[0][1] < drift[1][1]
    assert 0.0 < drift[1][0] < 1.0 and drift[0][1] > 0.0
