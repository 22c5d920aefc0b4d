"""tests for ckaqad/eval/gsm_sem/score.py: the prompts, greedy solving, metrics and their intervals."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.gsm_sem import data, score
from ckaqad.eval.gsm_sem.data import Problem, Variant
from tests.eval.gsm_sem_helpers import JANET, JANET_SOLUTION, JANET_VARIANT

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_8shot_prompt_is_the_olmes_context_byte_for_byte():
    rows = data._requests()
    for row in (rows[0], rows[500]):
        assert score.prompt_text(row["doc"]["question"], "8shot", None) == row["request"]["context"]


def test_chat_prompt_needs_a_template(tiny_tokenizer):
    with pytest.raises(ConfigError, match="chat template"):
        score.prompt_text("Q?", "chat", tiny_tokenizer)
    tiny_tokenizer.chat_template = TEMPLATE
    assert score.prompt_text("Q?", "chat", tiny_tokenizer).endswith("Q?\nassistant:")


def test_greedy_solving_does_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATE
    questions = ["A?", "Bb bb bb?", "Ccc ccc ccc ccc ccc?"]
    one = score.solve_greedy(tiny_model, tiny_tokenizer, questions, "chat", 8, batch_size=1, progress=False)
    three = score.solve_greedy(tiny_model, tiny_tokenizer, questions, "chat", 8, batch_size=3, progress=False)
    assert one == three and all(isinstance(t, str) and t for t in one)


def _variants(n_problems: int = 3) -> list[Variant]:
    out = []
    for i in range(n_problems):
        problem = Problem(f"p{i}", JANET, JANET_SOLUTION, "18")
        out += [Variant(problem, "facts", JANET_VARIANT + f" ({i}a)", "max"),
                Variant(problem, "entity", JANET_VARIANT + f" ({i}b)", "min")]
    return out


def test_score_model_compares_exact_fractions(monkeypatch):
    variants = _variants()
    # originals p0, p1, p2 then the six variants, in that order
    answers = ["#### 18", "The answer is 18.0", "it is 17", "The answer is 18", "so 36/2", "nothing", "18!",
               "The answer is 19", "then 18 or 20"]
    monkeypatch.setattr(score, "solve_greedy", lambda *a, **k: answers)
    scored = score.score_model(None, None, variants)
    assert [r["correct"] for r in scored["originals"].values()] == [True, True, False]
    assert [r["correct"] for r in scored["variants"]] == [True, True, False, True, False, False]
    table = score.metrics_table(scored)
    m = table["all"]
    assert (m["n_orig"], m["n_var"]) == (3, 6)
    assert m["acc_orig"] == pytest.approx(2 / 3) and m["acc_var"] == pytest.approx(3 / 6)
    assert m["drop"] == pytest.approx(2 / 3 - 1 / 2) and m["drop_rate"] == pytest.approx((2 / 3 - 1 / 2) / (2 / 3))
    assert m["p_var_given_orig"] == pytest.approx(3 / 4)  # p0's two variants, p1's two: 3 of 4 right
    assert table["level:max"]["n_var"] == 3 and table["mode:entity"]["acc_var"] == pytest.approx(2 / 3)
    assert set(table) == {"all", "level:none", "level:min", "level:min-med", "level:med", "level:med-max",
                          "level:max", "mode:facts", "mode:entity"}
    assert score.headline(table)["gsm_sem.drop"] == m["drop"]


def test_no_variants_is_an_error():
    with pytest.raises(DataError, match="no GSM-SEM variants"):
        score.score_model(None, None, [])


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (47, 120), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert score.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert all(math.isnan(x) for x in score.wilson(0, 0))


def test_mcnemar_exact_golden_and_symmetric():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    result = score.mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (10, 2)
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert score.mcnemar(b, a)["p_value"] == pytest.approx(result["p_value"])
    assert score.mcnemar([True], [True])["p_value"] == 1.0
    with pytest.raises(DataError):
        score.mcnemar([True], [])


def test_cluster_bootstrap_resamples_whole_problems():
    # every problem: original right, its two variants wrong -> every resample has drop 1
    assert score.cluster_bootstrap([(True, [False, False])] * 5) == (1.0, 1.0)
    clusters = [(True, [False, False, False, False]), (False, [False]), (True, [True]), (True, [True, True])]
    lo, hi = score.cluster_bootstrap(clusters, resamples=500, seed=1)
    assert lo <= score._drop(clusters) <= hi
    assert score.cluster_bootstrap(clusters, resamples=500, seed=1) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in score.cluster_bootstrap(clusters[:1]))
