"""tests for ckaqad/eval/gsm_sem/checks.py: the safe evaluator, numbers, answer extraction, the ladder."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckaqad.eval.gsm_sem import checks
from ckaqad.eval.gsm_sem.checks import (
    LEVELS,
    CheckResult,
    UnsafeExpression,
    at_least,
    check_calculations,
    deterministic_checks,
    extract_answer,
    level_reached,
    numbers_in,
    safe_eval,
)
from ckaqad.eval.gsm_sem.data import load_gsm8k
from tests.eval.gsm_sem_helpers import JANET, JANET_SOLUTION, JANET_VARIANT


@pytest.mark.parametrize("expression, value", [
    ("16-3-4", 9), ("3*.5", Fraction(3, 2)), ("(1+2)/4", Fraction(3, 4)), ("2**3", 8), ("-5+2", -3),
    ("7//2", 3), ("7%4", 3), ("1,000*2", 2000), ("3x4", 12), ("50%*8", 4), ("$20/4", 5)])
def test_safe_eval_golden_values(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "a+1", "abs(-2)", "(1).real", "2**100000", "1/0",
                                        "[1]", "1 if 1 else 2", "lambda: 1", ""])
def test_safe_eval_refuses_everything_but_arithmetic(expression):
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)


@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6), st.integers(1, 10**3))
def test_safe_eval_is_exact_fraction_arithmetic(a, b, c):
    assert safe_eval(f"({a}+{b})/{c}") == Fraction(a + b, c)
    assert safe_eval(f"{a}*{b}-{c}") == a * b - c


def test_every_gsm8k_calculation_checks_and_a_wrong_one_does_not():
    problems = load_gsm8k()
    assert sum(len(checks._CALC.findall(p.solution)) for p in problems) == 4282
    assert [p.id for p in problems if check_calculations(p.solution)] == []
    found = check_calculations("<<16-3-4=8>>8 and <<10/3=3.33>> and <<10/3=3.34>> and <<open(1)=1>>")
    assert len(found) == 3 and "evaluates to 9" in found[0] and "3.34" in found[1] and "Call" in found[2]


def test_numbers_digits_words_and_glued_ordinals():
    assert numbers_in("I had 1,200 apples, three pears and a dozen eggs on the 5th day") == \
        {1200, 3, 12}
    assert numbers_in("It costs $3.50 or 7/2", words=False) == {Fraction(7, 2), 7, 2}


def test_extract_answer_order_and_exact_fractions():
    assert extract_answer("18 then 20\n#### 1,000") == 1000
    assert extract_answer("We get 5. The answer is $3.50. Then 7") == Fraction(7, 2)
    assert extract_answer("first 4, then 5.") == 5
    assert extract_answer("no number here") is None
    assert extract_answer("The answer is 7/2") == Fraction(7, 2)


def test_deterministic_checks_of_a_good_variant_pass():
    result = deterministic_checks(JANET, JANET_SOLUTION, JANET_VARIANT, Fraction(18))
    assert result.deterministic(), result
    assert not result.calculations and result.question and not result.leak


@pytest.mark.parametrize("variant, failing", [
    (JANET_VARIANT.replace("16", "17"), "numbers"),  # a number changed: one missing, one added
    (JANET_VARIANT.replace("?", ", which is 18 dollars?"), "leak"),
    (JANET_VARIANT.replace("?", "."), "question"),
    (JANET, "novelty"),  # a copy changes nothing
    ("How much money for 16 eggs at $2?", "length"),
])
def test_deterministic_checks_catch_each_fault(variant, failing):
    result = deterministic_checks(JANET, JANET_SOLUTION, variant, Fraction(18))
    assert not result.deterministic()
    if failing == "numbers":
        assert result.numbers_missing == ["16"] and result.numbers_added == ["17"]
    if failing == "leak":
        assert result.leak
    if failing == "question":
        assert not result.question
    if failing == "novelty":
        assert result.novelty < checks.NOVELTY[0]
    if failing == "length":
        assert result.length_ratio < checks.LENGTH_RATIO[0]


def test_new_numbers_allowed_skips_the_number_check():
    variant = JANET_VARIANT.replace("16", "17")
    assert deterministic_checks(JANET, JANET_SOLUTION, variant, Fraction(18), new_numbers_allowed=True).deterministic()


def test_the_ladder_step_by_step():
    good = deterministic_checks(JANET, JANET_SOLUTION, JANET_VARIANT, Fraction(18))
    assert level_reached("", good, Fraction(18)) is None
    assert level_reached(JANET_VARIANT, good, Fraction(18)) == "min-med"  # the model checks did not run
    good.judge_votes = [True, True, False]
    assert level_reached(JANET_VARIANT, good, Fraction(18)) == "med"
    good.solves = ["18", "18", "20"]
    assert level_reached(JANET_VARIANT, good, Fraction(18)) == "med-max"
    good.judge_votes, good.solves = [True, True], ["18", "18", "18"]
    assert level_reached(JANET_VARIANT, good, Fraction(18)) == "max"
    bad = deterministic_checks(JANET, JANET_SOLUTION, JANET_VARIANT.replace("16", "17"), Fraction(18))
    assert level_reached("x", bad, Fraction(18)) == "min"
    assert level_reached("x", CheckResult(), Fraction(18)) == "none"


@given(st.lists(st.booleans(), max_size=4), st.lists(st.sampled_from(["18", "20", None]), max_size=4))
def test_levels_are_nested(votes, solves):
    """A candidate's level needs every check below it: `med` or above implies a True majority of votes, and
    `med-max` or above implies a gold majority of solves."""
    result = deterministic_checks(JANET, JANET_SOLUTION, JANET_VARIANT, Fraction(18))
    result.judge_votes, result.solves = votes, solves
    level = level_reached(JANET_VARIANT, result, Fraction(18))
    assert at_least(level, "min-med")
    assert at_least(level, "med") == (sum(votes) * 2 > len(votes))
    if at_least(level, "med-max"):
        assert solves.count("18") * 2 > len(solves)
    assert [at_least(level, lv) for lv in LEVELS] == sorted([at_least(level, lv) for lv in LEVELS], reverse=True)
