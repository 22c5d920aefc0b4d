"""HumanEval with a model: canonical-solution NLL, prompt styles, generation and truncation."""

from __future__ import annotations

import pytest
import torch

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.humaneval.generate import (
    INSTRUCT_PREFIX,
    STOP_SEQUENCES,
    canonical_nll,
    generate_completions,
    generation_input,
    make_stop_criteria,
    resolve_prompt_style,
    summarize_nll,
    truncate_completion,
)
from ckaqad.eval.humaneval.problems import load_problems
from ckaqad.eval.humaneval.score import evaluate_execution


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _shortest(problems, n):
    return sorted(problems, key=lambda p: len(p["prompt"]) + len(p["canonical_solution"]))[:n]


def _direct_nll_sum(model, tokenizer, problem) -> tuple[float, int]:
    """Unbatched reference: summed NLL of the solution tokens and their count."""
    prompt_ids = tokenizer(problem["prompt"])["input_ids"]
    full_ids = tokenizer(problem["prompt"] + problem["canonical_solution"])["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # byte-level: no merge across the boundary
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    targets = torch.tensor(full_ids[start:])
    nll = -logp[start - 1 : len(full_ids) - 1].gather(-1, targets[:, None]).sum()
    return float(nll), len(full_ids) - start


def test_nll_matches_direct_forward_regardless_of_batching(problems, tiny_model, tiny_tokenizer):
    pair = [problems[53], problems[23]]  # short ones of different lengths -> right padding in a batch
    assert len(pair[0]["prompt"] + pair[0]["canonical_solution"]) != len(
        pair[1]["prompt"] + pair[1]["canonical_solution"]
    )
    sums, counts = zip(*(_direct_nll_sum(tiny_model, tiny_tokenizer, p) for p in pair), strict=True)
    expected_token_mean = sum(sums) / sum(counts)

    batched = canonical_nll(tiny_model, tiny_tokenizer, pair, batch_size=2, progress=False)
    single = canonical_nll(tiny_model, tiny_tokenizer, pair, batch_size=1, progress=False)
    assert [r["task_id"] for r in batched] == [p["task_id"] for p in pair]
    for row, s, n, p in zip(batched, sums, counts, pair, strict=True):
        assert row["tokens"] == n == len(p["canonical_solution"].encode("utf-8"))
        assert row["nll"] == pytest.approx(s / n, abs=1e-4)
    for a, b in zip(batched, single, strict=True):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)

    summary = summarize_nll(batched)
    assert summary["nll_token_mean"] == pytest.approx(expected_token_mean, abs=1e-4)
    assert summary["nll_problem_mean"] == pytest.approx(
        sum(s / n for s, n in zip(sums, counts, strict=True)) / 2, abs=1e-4
    )
    assert summary["tokens"] == sum(counts) and summary["problems"] == 2
    with pytest.raises(DataError):
        summarize_nll([])


def test_nll_is_lower_after_training_on_the_solutions(problems, tiny_model_factory, tiny_tokenizer):
    subset = _shortest(problems, 4)
    random_init = tiny_model_factory(seed=0)
    trained = tiny_model_factory(seed=0)
    before = summarize_nll(canonical_nll(random_init, tiny_tokenizer, subset, progress=False))

    torch.manual_seed(0)
    trained.train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    batch = tiny_tokenizer(
        [p["prompt"] + p["canonical_solution"] for p in subset], padding=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(40):
        loss = trained(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained.eval()

    after = summarize_nll(canonical_nll(trained, tiny_tokenizer, subset, progress=False))
    assert before["nll_token_mean"] == pytest.approx(
        summarize_nll(canonical_nll(tiny_model_factory(seed=0), tiny_tokenizer, subset, progress=False))[
            "nll_token_mean"
        ]
    )  # same init, same score
    assert after["nll_token_mean"] < before["nll_token_mean"] - 1.0
    assert after["nll_problem_mean"] < before["nll_problem_mean"] - 1.0


def test_truncate_completion_at_stop_sequences():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert truncate_completion("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate_completion("    return x\nprint(f(1))\nclass A: pass") == "    return x"
    assert truncate_completion("    y = 1\n# comment\n    return y") == "    y = 1"
    assert truncate_completion("    if x:\n        return 1\nif __name__ == '__main__':") == (
        "    if x:\n        return 1"
    )
    assert truncate_completion("    return x  # no stop here\n") == "    return x  # no stop here\n"
    assert truncate_completion("\nclass") == ""
    assert truncate_completion("abc\ndefine", stop_sequences=["\nxyz"]) == "abc\ndefine"


def test_stop_criteria_flags_rows_with_a_stop_sequence(tiny_tokenizer):
    prompt = tiny_tokenizer("def f():\n")["input_ids"]
    rows = [prompt + tiny_tokenizer(tail)["input_ids"] for tail in ("    return 1\ndef", "    return 2\n  ")]
    criteria = make_stop_criteria(tiny_tokenizer, len(prompt), STOP_SEQUENCES)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tiny_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    done = criteria[0](ids, None)
    assert done.tolist() == [True, False]


def test_generate_completions_shapes_and_batching(problems, tiny_model, tiny_tokenizer):
    pair = [problems[53], problems[23]]  # prompts of different length: left padding in one batch
    tiny_tokenizer.padding_side = "right"
    rows = generate_completions(
        tiny_model, tiny_tokenizer, pair, max_new_tokens=8, batch_size=2, progress=False
    )
    assert tiny_tokenizer.padding_side == "right"  # restored
    assert [(r["task_id"], r["sample"]) for r in rows] == [(p["task_id"], 0) for p in pair]
    for r in rows:
        assert isinstance(r["completion"], str) and len(r["completion"]) <= 8
        assert not any(stop in r["completion"] for stop in STOP_SEQUENCES)
    alone = generate_completions(
        tiny_model, tiny_tokenizer, pair, max_new_tokens=8, batch_size=1, progress=False
    )
    assert [r["completion"] for r in alone] == [r["completion"] for r in rows]

    sampled = generate_completions(
        tiny_model,
        tiny_tokenizer,
        pair,
        max_new_tokens=8,
        num_samples=2,
        temperature=0.8,
        seed=3,
        progress=False,
    )
    assert [(r["task_id"], r["sample"]) for r in sampled] == [
        (p["task_id"], s) for p in pair for s in range(2)
    ]
    again = generate_completions(
        tiny_model,
        tiny_tokenizer,
        pair,
        max_new_tokens=8,
        num_samples=2,
        temperature=0.8,
        seed=3,
        progress=False,
    )
    assert [r["completion"] for r in again] == [r["completion"] for r in sampled]
    with pytest.raises(ConfigError):
        generate_completions(tiny_model, tiny_tokenizer, pair, max_new_tokens=0, progress=False)
    with pytest.raises(ConfigError):
        generate_completions(tiny_model, tiny_tokenizer, pair, temperature=-1.0, progress=False)


def test_generate_completions_decodes_and_truncates(problems, tiny_model, tiny_tokenizer, monkeypatch):
    """With ``generate`` replaced by a fixed continuation, the completion is exactly the text up to the
    first stop sequence (special tokens dropped)."""
    tail = "    return x + y\n\ndef helper():\n    pass"
    tail_ids = tiny_tokenizer(tail)["input_ids"] + [tiny_tokenizer.eos_token_id]
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen["left_padded"] = bool(attention_mask[:, -1].all()) and not bool(attention_mask[:, 0].all())
        seen["kwargs"] = kwargs
        extra = torch.tensor([tail_ids] * input_ids.shape[0])
        return torch.cat([input_ids, extra], dim=1)

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    pair = [problems[53], problems[0]]
    rows = generate_completions(
        tiny_model, tiny_tokenizer, pair, max_new_tokens=64, batch_size=2, progress=False
    )
    assert [r["completion"] for r in rows] == ["    return x + y\n"] * 2
    assert seen["left_padded"]  # the shorter prompt was padded on the left
    assert seen["kwargs"]["do_sample"] is False and seen["kwargs"]["max_new_tokens"] == 64


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = None


def test_prompt_style_auto_follows_the_chat_template(tiny_tokenizer, chat_tokenizer):
    assert resolve_prompt_style("auto", chat_tokenizer) == "instruct"
    assert resolve_prompt_style("completion", chat_tokenizer) == "completion"
    chat_tokenizer.chat_template = None
    assert resolve_prompt_style("auto", tiny_tokenizer) == "completion"
    with pytest.raises(ConfigError, match="chat template"):
        resolve_prompt_style("instruct", tiny_tokenizer)
    with pytest.raises(ConfigError, match="unknown HumanEval prompt style"):
        resolve_prompt_style("fewshot", tiny_tokenizer)


def test_instruct_input_is_the_chat_request_with_the_prefilled_answer(problems, chat_tokenizer):
    prompt = problems[53]["prompt"]
    ids = generation_input(chat_tokenizer, prompt, "instruct")
    text = chat_tokenizer.decode(ids)
    # lm-eval's humaneval_instruct: the request holds the prompt in a fence, the assistant turn starts
    # with the prompt's code so the model's next tokens are the function body.
    assert text.startswith("<s>user\nWrite a solution to the following problem and make sure that it passes "
                           f"the tests:\n```python\n{prompt}\n```\n</s>\n<s>assistant\n")
    assert text.endswith(INSTRUCT_PREFIX.format(prompt=prompt))
    assert generation_input(chat_tokenizer, prompt, "completion") == chat_tokenizer(prompt)["input_ids"]


def test_instruct_completion_ends_at_the_closing_fence(problems, tiny_model, chat_tokenizer, monkeypatch):
    tail_ids = chat_tokenizer("    return x + y\n```\nThis adds.")["input_ids"] + [chat_tokenizer.eos_token_id]
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen["prompt"] = chat_tokenizer.decode(input_ids[0][attention_mask[0].bool()])
        return torch.cat([input_ids, torch.tensor([tail_ids] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    add = problems[53]
    [instruct] = generate_completions(tiny_model, chat_tokenizer, [add], prompt_style="instruct", progress=False)
    assert instruct["completion"] == "    return x + y\n"
    assert seen["prompt"].endswith(INSTRUCT_PREFIX.format(prompt=add["prompt"]))
    assert evaluate_execution([add], [instruct])["pass@1"] == 1.0
    [bare] = generate_completions(tiny_model, chat_tokenizer, [add], prompt_style="completion", progress=False)
    assert bare["completion"] == "    return x + y\n```\nThis adds."  # no fence stop in completion mode
    assert seen["prompt"] == add["prompt"]
