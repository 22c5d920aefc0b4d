"""lm-evaluation-harness on the in-memory tiny model with a local multiple-choice task, offline."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.eval.lmeval import compact_results, run_lm_eval

QUESTIONS = [
    ("2 + 2 =", ["4", "5"]),
    ("The sky is", ["blue", "green", "loud"]),
    ("a b c", ["d", "e", "f", "g"]),
    ("Python is a", ["language", "snake", "fruit"]),
    ("def f(x): return", ["x", "None"]),
    ("1, 2, 3,", ["4", "5", "6", "7"]),
]


def _context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of ``continuation`` after ``context``, one unpadded forward."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _predictions(model, tokenizer) -> list[int]:
    preds = []
    for question, choices in QUESTIONS:
        scores = [_loglikelihood(model, tokenizer, _context(question), " " + c) for c in choices]
        preds.append(max(range(len(choices)), key=lambda i: scores[i]))
    return preds


def _write_task(tmp_path, labels: list[int], name: str = "tiny_mc"):
    data = tmp_path / "tiny_mc.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for (question, choices), label in zip(QUESTIONS, labels, strict=True):
            f.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        f"  cache_dir: {tmp_path / 'hf_datasets_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n",
        encoding="utf-8",
    )
    return task_dir


@pytest.fixture(autouse=True)
def _restore_offline_switches(monkeypatch):
    """run_lm_eval turns the HF libraries offline for good; undo that after each test."""
    import datasets.config
    import huggingface_hub.constants

    from ckaqad.eval.lmeval import OFFLINE_ENV

    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)  # recorded: restored (or removed again) at teardown
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS"):
        monkeypatch.setattr(datasets.config, name, getattr(datasets.config, name))


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to resolve a name or open a connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_local_task_accuracy_matches_independent_scoring(tmp_path, tiny_model, tiny_tokenizer, no_network):
    preds = _predictions(tiny_model, tiny_tokenizer)
    # labels: right for docs 0, 2, 3, 5 and wrong for docs 1 and 4 -> acc 4/6, first three docs 2/3
    wrong = {1, 4}
    labels = [(p + 1) % len(QUESTIONS[i][1]) if i in wrong else p for i, p in enumerate(preds)]
    task_dir = _write_task(tmp_path, labels)

    tiny_model.train()
    results = run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc"], str(task_dir), batch_size=4, include_defaults=False)
    assert set(results) == {"tiny_mc"}
    metrics = results["tiny_mc"]
    assert metrics["acc"] == pytest.approx(4 / 6, abs=1e-9)
    assert "acc_stderr" in metrics and metrics["acc_stderr"] > 0
    assert metrics["samples"] == 6
    assert all(isinstance(v, float) for v in metrics.values())
    assert tiny_model.training  # mode restored

    limited = run_lm_eval(
        tiny_model, tiny_tokenizer, ["tiny_mc"], str(task_dir), limit=3, batch_size=2, include_defaults=False
    )
    assert limited["tiny_mc"]["acc"] == pytest.approx(2 / 3, abs=1e-9)
    assert limited["tiny_mc"]["samples"] == 3

    assert no_network == []  # neither lm-eval, datasets nor the hub tried to go online
    import datasets.config

    assert datasets.config.HF_HUB_OFFLINE is True


def test_unknown_task_is_a_config_error(tmp_path, tiny_model, tiny_tokenizer):
    task_dir = _write_task(tmp_path, [0] * len(QUESTIONS))
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'tiny_mcq'.*did you mean: tiny_mc"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mcq"], str(task_dir), include_defaults=False)


def test_unknown_task_among_the_builtin_registry(tmp_path, tiny_model, tiny_tokenizer):
    task_dir = _write_task(tmp_path, [0] * len(QUESTIONS))
    with pytest.raises(ConfigError) as info:
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc", "hellaswagg"], str(task_dir))
    message = str(info.value)
    assert "'hellaswagg'" in message and "hellaswag" in message.split("did you mean:")[1]
    assert len(message) < 1000  # ~15k registered names are counted, not listed


@pytest.mark.parametrize("limit", [0, -3, 0.5, True])
def test_bad_limit_is_a_config_error(tmp_path, tiny_model, tiny_tokenizer, limit):
    with pytest.raises(ConfigError, match="limit"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc"], str(tmp_path), limit=limit, include_defaults=False)


def test_bad_arguments_are_config_errors(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError):
        run_lm_eval(tiny_model, tiny_tokenizer, [], str(tmp_path))
    with pytest.raises(ConfigError):
        run_lm_eval(tiny_model, tiny_tokenizer, "tiny_mc", str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc"], str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="batch_size"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc"], str(tmp_path), batch_size=0)
    with pytest.raises(ConfigError, match="num_fewshot"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["tiny_mc"], str(tmp_path), num_fewshot=-1)


def test_compact_results_strips_filters_and_keeps_stderr():
    raw = {
        "results": {
            "mc": {"alias": "mc", "name": "mc", "sample_len": 6, "acc,none": 0.5, "acc_stderr,none": 0.2},
            "gen": {
                "alias": "gen",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": "N/A",
                "exact_match,none": 0.75,
                "flag,none": True,
            },
        },
        "n-samples": {"mc": {"original": 10, "effective": 6}},
    }
    assert compact_results(raw) == {
        "mc": {"acc": 0.5, "acc_stderr": 0.2, "samples": 6.0},
        "gen": {"exact_match,strict-match": 0.25, "exact_match": 0.75},
    }
