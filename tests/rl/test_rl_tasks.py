"""The RL tasks: rewards on hand-written right and wrong answers, generated answers that are right, held-out
splits that training never draws, and the registry's names."""

from __future__ import annotations

import random
import re

import pytest

from ckaqad.errors import ConfigError
from ckaqad.rl import arithmetic, code
from ckaqad.rl.task import Problem
from ckaqad.rl.tasks import TASKS


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def recomputed_answer(question: str) -> int:
    """The answer from the question's own numbers, per template (written independently of the generator)."""
    n = numbers(question)
    if "buys" in question and "gives" in question:
        return n[0] + n[1] - n[2]
    if "boxes with" in question:
        return n[0] * n[1]
    if "bags of" in question:
        return n[0] * n[1] + n[2]
    if "equally among" in question:
        return n[0] // n[1]
    if "on Monday" in question:
        return n[0] - n[1] - n[2]
    raise AssertionError(f"unknown template: {question}")


def test_generated_arithmetic_answers_are_exact():
    rng = random.Random(1)
    for _ in range(500):
        problem = arithmetic.sample_problem(rng)
        assert int(problem.answer) == recomputed_answer(problem.question)
        if "equally among" in problem.question:
            assert numbers(problem.question)[0] % numbers(problem.question)[1] == 0


@pytest.mark.parametrize("completion, right", [
    ("Tom has 7 + 5 = 12 apples now.", True),
    ("12", True),
    ("The answer is 12.\n", True),
    ("He has 12 apples, not 13", False),
    ("Tom has 7 apples and buys 5.", False),
    ("twelve", False),
    ("", False),
    ("-12", False),
])
def test_arithmetic_reward_on_hand_written_answers(completion, right):
    problem = Problem(id="q", question="Tom has 7 apples. Tom buys 5 more. How many?", answer="12")
    assert arithmetic.reward(problem, completion) == (1.0 if right else 0.0)


def test_arithmetic_final_number_reads_signs_and_thousands():
    assert arithmetic.final_number("1,200 and then -3") == -3
    assert arithmetic.final_number("about 1,200") == 1200
    assert arithmetic.final_number("none") is None


def test_training_never_draws_a_held_out_problem_and_is_a_function_of_seed_and_step():
    task = TASKS.get("arithmetic")
    held = {p.id for p in task.heldout}
    assert len(held) == len(task.heldout) == arithmetic.HELDOUT_SIZE
    drawn = [p.id for step in range(200) for p in task.train_problems(0, step, 4)]
    assert not held & set(drawn)
    assert task.train_problems(3, 7, 4) == task.train_problems(3, 7, 4)
    assert task.train_problems(3, 7, 4) != task.train_problems(3, 8, 4)


def test_code_right_bodies_pass_and_wrong_ones_fail():
    """The completion continues `    return`: each canonical one-line body minus that start passes."""
    one_liners = [p for p in code.PROBLEMS if p.answer.startswith(code.BODY_START) and p.answer.count("\n") == 1]
    assert len(one_liners) == len(code.PROBLEMS) - 1  # all but factorial
    for problem in one_liners:
        assert code.reward(problem, problem.answer.removeprefix(code.BODY_START)) == 1.0, problem.id
    factorial = next(p for p in code.PROBLEMS if p.data["entry_point"] == "factorial")
    assert code.reward(factorial, " 1 if n < 2 else n * factorial(n - 1)\n") == 1.0
    assert code.reward(factorial, " n * (n - 1)\n") == 0.0
    add = code.PROBLEMS[0]
    assert code.reward(add, " a - b\n") == 0.0
    assert code.reward(add, " a +\n") == 0.0  # syntax error
    assert code.reward(add, "\n") == 0.0  # bare return: None


def test_code_reward_cuts_the_body_at_the_fence_and_stop_sequences():
    add = code.PROBLEMS[0]
    assert code.reward(add, " a + b\n```\nThis adds the numbers, then raise SystemExit") == 1.0
    assert code.reward(add, " a + b\n\ndef other():\n    raise ValueError\nother()") == 1.0
    assert code.reward(add, " a + b\nassert add(1, 1) == 3\n") == 0.0  # not a stop: the body runs it


def test_code_split_is_disjoint_and_complete():
    task = TASKS.get("code")
    held = {p.id for p in task.heldout}
    train = {p.id for p in code.TRAIN}
    assert held and train and not held & train
    assert held | train == {p.id for p in code.PROBLEMS}
    assert {p.id for step in range(50) for p in task.train_problems(0, step, 3)} <= train


def test_prompts_use_the_chat_template_when_there_is_one(tiny_tokenizer):
    problem = arithmetic.TASK.heldout[0]
    plain = tiny_tokenizer.decode(arithmetic.prompt_ids(problem, tiny_tokenizer))
    assert problem.question in plain and arithmetic.INSTRUCTION in plain
    tiny_tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    chat = tiny_tokenizer.decode(arithmetic.prompt_ids(problem, tiny_tokenizer))
    assert chat == f"<u>{problem.question} {arithmetic.INSTRUCTION}</u><a>"
    code_prompt = tiny_tokenizer.decode(code.prompt_ids(code.PROBLEMS[0], tiny_tokenizer))
    assert code_prompt == code.PROBLEMS[0].question + code.BODY_START  # bare, the body opened


def test_unknown_task_names_the_close_one():
    with pytest.raises(ConfigError, match="did you mean: arithmetic"):
        TASKS.get("arithmetc")
