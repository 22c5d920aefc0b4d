"""Tests for `ckaqad gsm-sem` (commands/gsm_sem.py) and `ckaqad eval --suite gsm-sem`: generation through a
loopback chat-completions server end to end, replay from the cache, scoring a tiny model, and the errors."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_teacher

from ckaqad import cli
from ckaqad.commands import eval as eval_command
from ckaqad.commands import gsm_sem
from tests.eval.gsm_sem_helpers import JANET_VARIANT, chat_server, released_row, scripted_reply, write_released

pytestmark = pytest.mark.usefixtures("one_thread")


def generate_args(url: str, tmp_path, out: str, seed: int = 0) -> list[str]:
    return ["gsm-sem", "generate", "--limit", "2", "--modes", "facts,backward", "--generator", "big-model",
            "--generator-url", url, "--judges", f"judge-a,judge-b@{url}", "--solver", "solver", "--solves", "3",
            "--max-attempts", "2", "--seed", str(seed), "--cache", str(tmp_path / "cache.sqlite"),
            "--no-progress", "--out", str(tmp_path / out)]


def test_generate_through_a_chat_server_then_replay_from_the_cache(tmp_path, capsys):
    with chat_server(lambda body: scripted_reply(body)) as (url, received):
        assert cli.main(generate_args(url, tmp_path, "a")) == 0
        calls = len(received)
        assert cli.main(generate_args(url, tmp_path, "b")) == 0
        assert len(received) == calls  # the replay asked the server nothing
        assert cli.main(generate_args(url, tmp_path, "c", seed=1)) == 0
        assert len(received) > calls
    first = (tmp_path / "a" / "variants.jsonl").read_text()
    assert first == (tmp_path / "b" / "variants.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    # GSM8K's first two problems x two modes; the scripted Janet rewrite fits only problem 0
    assert [(r["problem"]["id"], r["mode"]) for r in rows] == \
        [("gsm8k-0", "facts"), ("gsm8k-0", "backward"), ("gsm8k-1", "facts"), ("gsm8k-1", "backward")]
    assert [r["level"] for r in rows[:2]] == ["max", "max"] and rows[0]["text"] == JANET_VARIANT
    assert all(r["level"] == "none" for r in rows[2:])  # Janet's numbers are not problem 1's
    models = {body["model"] for body in received}
    assert models == {"big-model", "judge-a", "judge-b", "solver"}
    report = json.loads((tmp_path / "a" / "gsm_sem.json").read_text())
    assert report["yields"]["facts"]["max"] == 0.5 and report["yields"]["all"]["n"] == 4
    html = (tmp_path / "a" / "gsm_sem.html").read_text()
    assert "<ins>" in html and "<del>" in html and "min-med" in html
    assert "# GSM-SEM generation" in capsys.readouterr().out


def test_score_and_eval_suite_on_a_tiny_model(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    save_tiny_teacher(teacher)
    released = write_released(tmp_path / "rel", {"SEM.jsonl": [released_row("s1"),
                                                                released_row("s2", final_answer="20")]})
    assert cli.main(["gsm-sem", "score", "--variants", str(released), "--level", "max", "--models",
                     f"{teacher},{teacher}", "--max-tokens", "3", "--batch-size", "2", "--no-progress",
                     "--out", str(tmp_path / "score")]) == 0
    result = json.loads((tmp_path / "score" / "score.json").read_text())
    labels = list(result["models"])
    assert len(labels) == 2 and result["meta"]["n_variants"] == 2 and result["meta"]["n_originals"] == 2
    a, b = (result["models"][label] for label in labels)
    assert [r["completion"] for r in a["variants"]] == [r["completion"] for r in b["variants"]]  # greedy
    assert all(c["only_a"] == c["only_b"] == 0 and c["p_value"] == 1.0 for c in result["comparisons"])
    assert (tmp_path / "score" / "score.html").is_file()
    assert "ckaqad: warning: 1 released rows have a final_answer" in capsys.readouterr().out

    payload = eval_command.run(eval_command.Config(
        model=str(teacher), suite="gsm-sem", gsm_sem_variants=str(released), gsm_sem_level="max",
        gsm_sem_max_tokens=3, batch_size=2, out=str(tmp_path / "eval"), device="cpu"))
    assert payload["gsm_sem"]["variants"] == a["variants"]  # the suite and the command score alike
    assert "GSM-SEM (variants at level max" in (tmp_path / "eval" / "eval.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["gsm-sem", "score"], "needs --variants"),
    (["gsm-sem", "generate", "--modes", "fact"], "did you mean: facts"),
    (["gsm-sem", "generate", "--strictness", "high"], "--strictness must be one of"),
    (["gsm-sem", "generate", "--source", "/nonexistent.jsonl", "--cache", "CACHE"], "no such file"),
    (["gsm-sem", "generate", "--generator-url", "ftp://x", "--cache", "CACHE"], "must be an http"),
    (["gsm-sem", "score", "--variants", "/nonexistent"], "none of SEM.jsonl"),
    (["gsm-sem", "redo"], "action"),
    (["eval", "--suite", "gsm-sem"], "needs --gsm-sem-variants"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "c.sqlite") if a == "CACHE" else a for a in argv]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckaqad: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_score_level_with_no_variant_is_an_error(tmp_path, capsys):
    labels = {"none": True, "min": False, "min-med": False, "med": False, "med-max": False, "max": False}
    released = write_released(tmp_path / "rel", {"SEM.jsonl": [released_row("s1", labels=labels)]})
    assert cli.main(["gsm-sem", "score", "--variants", str(released), "--level", "min",
                     "--out", str(tmp_path / "out")]) == 2
    assert "reached level min" in capsys.readouterr().err


def test_config_mirrors_the_modes_registry():
    assert set(gsm_sem.generate.MODES.names()) == {"facts", "backward", "entity", "attribute", "relationship"}
