"""What an RL task is: problems with a verifiable answer, a prompt builder, a reward function and a held-out
split. The tasks themselves are in `arithmetic.py` and `code.py`; `tasks.py` registers them by name."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One problem: `id` (unique within its task), the question text, the reference answer, and anything
    else the reward needs (`data`: a code problem's tests)."""

    id: str
    question: str
    answer: str
    data: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A verifiable task. `sample(rng)` draws one training problem; `heldout` is the evaluation split (training
    never draws one of its ids); `prompt_ids(problem, tokenizer)` are the token ids the model continues;
    `reward(problem, completion)` scores the decoded completion in [0, 1] (1 = right); `max_new_tokens` is the
    completion budget the task is meant for."""

    name: str
    description: str
    sample: Callable[[random.Random], Problem]
    heldout: tuple[Problem, ...]
    prompt_ids: Callable[[Problem, object], list[int]]
    reward: Callable[[Problem, str], float]
    max_new_tokens: int = 32

    def train_problems(self, seed: int, step: int, n: int) -> list[Problem]:
        """The `n` training problems of `step`: a pure function of (seed, step), so a resumed run draws the
        same ones, and never a held-out problem."""
        rng = random.Random(f"{self.name}:{seed}:{step}")
        held = {p.id for p in self.heldout}
        problems: list[Problem] = []
        while len(problems) < n:
            problem = self.sample(rng)
            if problem.id not in held:
                problems.append(problem)
        return problems


def chat_or_plain_ids(tokenizer, user_text: str, assistant_prefix: str = "") -> list[int]:
    """`user_text` as one user turn of the tokenizer's chat template (the assistant turn opened and prefilled
    with `assistant_prefix`), or, for a tokenizer without a template, `user_text + "\\n" + assistant_prefix`."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"{user_text}\n{assistant_prefix}")["input_ids"])
