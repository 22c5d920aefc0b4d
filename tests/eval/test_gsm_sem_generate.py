"""tests for ckaqad/eval/gsm_sem/generate.py: prompts, candidate cleaning, retries to the target level, replay."""

from __future__ import annotations

import pytest

from ckaqad.errors import ConfigError
from ckaqad.eval.gsm_sem import generate
from ckaqad.eval.gsm_sem.backends import Sampling
from ckaqad.eval.gsm_sem.data import Problem
from tests.eval.gsm_sem_helpers import JANET, JANET_SOLUTION, JANET_VARIANT, scripted_reply

PROBLEM = Problem("gsm8k-0", JANET, JANET_SOLUTION, "18")


class Scripted:
    """A backend answering from a function of (prompt text, seed), recording the calls."""

    kind, model = "scripted", "scripted"

    def __init__(self, reply=lambda prompt, seed: scripted_reply({"messages": [{"content": prompt}]})):
        self.reply, self.calls = reply, []

    def chat(self, messages, sampling: Sampling, seed: int) -> str:
        self.calls.append((messages[-1]["content"], seed))
        return self.reply(messages[-1]["content"], seed)


def test_prompts_show_the_question_or_only_the_solution():
    facts = generate.rewrite_messages(generate.MODES.get("facts"), PROBLEM)[0]["content"]
    backward = generate.rewrite_messages(generate.MODES.get("backward"), PROBLEM)[0]["content"]
    assert JANET in facts and "keeping the numbers and the core problem the same" in facts
    assert JANET not in backward and "<<" not in backward and "9 * 2 = $18" in backward
    assert "for which this worked answer would be correct" in backward


@pytest.mark.parametrize("reply, cleaned", [
    (f"New question: {JANET_VARIANT}", JANET_VARIANT), (f'"{JANET_VARIANT}"', JANET_VARIANT),
    (f"**Question:** {JANET_VARIANT}\n\nThis keeps the numbers.", JANET_VARIANT), ("no question", "no question")])
def test_clean_candidate(reply, cleaned):
    assert generate.clean_candidate(reply) == cleaned


def test_parse_vote():
    assert generate.parse_vote("True.") and generate.parse_vote("yes, it is")
    assert not generate.parse_vote("False") and not generate.parse_vote("maybe") and not generate.parse_vote("")


def test_a_good_candidate_reaches_max_in_one_attempt():
    gen, judge, solver = Scripted(), Scripted(), Scripted()
    variant = generate.generate_item(PROBLEM, "facts", gen, [judge], solver, generate.GenerateSettings(solves=3))
    assert variant.level == "max" and variant.text == JANET_VARIANT and variant.checks["attempt_levels"] == ["max"]
    assert len(gen.calls) == 1 and len(judge.calls) == 1 and len(solver.calls) == 3
    assert len({seed for _, seed in solver.calls}) == 3  # independent solves


def test_retries_until_the_target_and_keeps_the_best():
    # attempt 0 copies the question (fails novelty), attempt 1 is good
    gen = Scripted(lambda prompt, seed: JANET if seed == first_seed else JANET_VARIANT)
    first_seed = generate.derive_seed(0, PROBLEM.id, "facts", 0, "generate")
    variant = generate.generate_item(PROBLEM, "facts", gen, [Scripted()], Scripted(), generate.GenerateSettings())
    assert variant.checks["attempt_levels"] == ["min", "max"] and variant.attempt == 1
    # a judge that always says False: every attempt stops at min-med, the first one is kept
    variant = generate.generate_item(PROBLEM, "facts", Scripted(), [Scripted(lambda p, s: "False")], Scripted(),
                                     generate.GenerateSettings(max_attempts=2))
    assert variant.level == "min-med" and variant.attempt == 0 and variant.checks["attempt_levels"] == ["min-med"] * 2


def test_the_run_seed_decides_every_call():
    def run(seed):
        gen = Scripted()
        generate.generate_variants([PROBLEM], ["facts", "entity"], gen, [Scripted()], Scripted(),
                                   generate.GenerateSettings(seed=seed, target="none"), progress=False)
        return [s for _, s in gen.calls]

    assert run(0) == run(0) and set(run(0)).isdisjoint(run(1))


def test_yields_per_mode_and_level():
    gen = Scripted(lambda prompt, seed: "Who?" if "entities" in prompt else JANET_VARIANT)
    variants = generate.generate_variants([PROBLEM], ["facts", "entity"], gen, [Scripted()], Scripted(),
                                          generate.GenerateSettings(max_attempts=1), progress=False)
    table = generate.yields(variants)
    assert table["facts"]["max"] == 1.0 and table["entity"]["none"] == 1.0 and table["entity"]["min"] == 0.0
    assert table["all"]["max"] == 0.5 and table["all"]["n"] == 2


def test_unknown_mode_and_level():
    with pytest.raises(ConfigError, match="did you mean: facts"):
        generate.generate_variants([PROBLEM], ["fact"], Scripted(), [Scripted()], Scripted(),
                                   generate.GenerateSettings(), progress=False)
    with pytest.raises(ConfigError, match="strictness"):
        generate.GenerateSettings(target="maximum")
