"""Arithmetic word problems the project generates, with exact integer answers: one or two operations on small
numbers, in a handful of templates. The reward is 1 when the last number of the completion is the answer.

The difficulty was set so that the embedded SmolLM2-135M-Instruct starts between 0 and 50% (greedy, held-out
split): single additions it mostly gets right, two-step problems mostly not (docs/rl.md, measured).
"""

from __future__ import annotations

import random
import re

from ckaqad.rl.task import Problem, Task, chat_or_plain_ids

NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lena", "Omar", "Yuki", "Paul", "Rita")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards")
INSTRUCTION = "Give the final answer as a number."
HELDOUT_SEED = "arithmetic-heldout"
HELDOUT_SIZE = 64

_NUMBER = re.compile(r"-?\d[\d,]*")


def _add_then_give(rng: random.Random, name: str, item: str) -> tuple[str, int]:
    a, b, c = rng.randint(5, 30), rng.randint(2, 20), rng.randint(2, 10)
    return (f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to a friend. "
            f"How many {item} does {name} have now?"), a + b - c


def _boxes(rng: random.Random, name: str, item: str) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    return f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?", a * b


def _bags_plus(rng: random.Random, name: str, item: str) -> tuple[str, int]:
    a, b, c = rng.randint(2, 6), rng.randint(3, 10), rng.randint(1, 9)
    return (f"{item.capitalize()} come in bags of {b}. {name} buys {a} bags and {c} loose {item}. "
            f"How many {item} does {name} buy in all?"), a * b + c


def _share(rng: random.Random, name: str, item: str) -> tuple[str, int]:
    each, friends = rng.randint(2, 9), rng.randint(2, 6)
    return (f"{name} shares {each * friends} {item} equally among {friends} friends. "
            f"How many {item} does each friend get?"), each


def _left_after_two(rng: random.Random, name: str, item: str) -> tuple[str, int]:
    a = rng.randint(20, 60)
    b, c = rng.randint(3, 12), rng.randint(3, 12)
    return (f"{name} had {a} {item}. {name} used {b} on Monday and {c} on Tuesday. "
            f"How many {item} are left?"), a - b - c


TEMPLATES = (_add_then_give, _boxes, _bags_plus, _share, _left_after_two)


def sample_problem(rng: random.Random) -> Problem:
    template = rng.choice(TEMPLATES)
    question, answer = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
    return Problem(id=question, question=question, answer=str(answer))


def heldout_problems(n: int = HELDOUT_SIZE) -> tuple[Problem, ...]:
    """`n` distinct problems from a fixed generator, disjoint from training by construction (Task)."""
    rng = random.Random(HELDOUT_SEED)
    found: dict[str, Problem] = {}
    while len(found) < n:
        problem = sample_problem(rng)
        found.setdefault(problem.id, problem)
    return tuple(found.values())


def final_number(completion: str) -> int | None:
    """The last integer written in `completion` (thousands commas allowed), or None."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return None
    try:
        return int(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def reward(problem: Problem, completion: str) -> float:
    """1.0 when the last number of the completion is the exact answer, else 0.0."""
    return float(final_number(completion) == int(problem.answer))


def prompt_ids(problem: Problem, tokenizer) -> list[int]:
    return chat_or_plain_ids(tokenizer, f"{problem.question} {INSTRUCTION}")


TASK = Task(name="arithmetic", description="generated one- and two-step arithmetic word problems, exact answers",
            sample=sample_problem, heldout=heldout_problems(), prompt_ids=prompt_ids, reward=reward,
            max_new_tokens=32)
