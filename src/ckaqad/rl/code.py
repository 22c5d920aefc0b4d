"""Small Python function problems the project ships (`ckaqad/assets/rl_code_problems.json`: HumanEval's fields —
prompt = signature + docstring, test = `check(candidate)`, entry_point — at a 135M model's level), scored by
running the completion against the tests in the HumanEval sandbox (`eval/humaneval/sandbox.py`).

The prompt is the bare HumanEval-style prompt opened with `    return` (BODY_START says why); the completion is
the rest of the function body, cut at a closing code fence or a HumanEval stop sequence. A fixed third of the
problems is the held-out split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ckaqad.errors import DataError
from ckaqad.eval.humaneval.generate import FENCE, STOP_SEQUENCES, truncate_completion
from ckaqad.eval.humaneval.problems import PROBLEM_KEYS
from ckaqad.eval.humaneval.sandbox import check_completion
from ckaqad.rl.task import Problem, Task

PROBLEMS_FILE = Path(__file__).resolve().parents[1] / "assets" / "rl_code_problems.json"
BODY_START = "    return"
"""What the prompt ends with, so the completion is the rest of the body's first line. Measured on the embedded
SmolLM2-135M-Instruct (greedy, 48 tokens): lm-eval's `humaneval_instruct` prefill (the function after
`\"\"\"\n\n`), the same with one newline or with the body's indent, and the bare prompt all pass 0 / 18 (the
model closes the function at once and writes tests or prose); ending the bare prompt with `    return` passes
13 / 18 (held-out 4 / 6)."""
HELDOUT_EVERY = 3
"""Every third problem (in file order) is held out."""
TIMEOUT_S = 5.0


def load_problems(path: Path = PROBLEMS_FILE) -> list[Problem]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the code problems {path}: {exc}") from exc
    problems = []
    for row in rows:
        missing = [key for key in PROBLEM_KEYS if key not in row]
        if missing:
            raise DataError(f"{path}: problem {row.get('task_id', '?')!r} lacks {missing}")
        problems.append(Problem(id=row["task_id"], question=row["prompt"], answer=row["canonical_solution"],
                                data={key: row[key] for key in PROBLEM_KEYS}))
    return problems


PROBLEMS = load_problems()
HELDOUT = tuple(p for i, p in enumerate(PROBLEMS) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1)
TRAIN = tuple(p for p in PROBLEMS if p not in HELDOUT)


def body_of(completion: str) -> str:
    """The function body: BODY_START, then the completion cut at the closing code fence and HumanEval's stop
    sequences."""
    return BODY_START + truncate_completion(completion, (FENCE, *STOP_SEQUENCES))


def reward(problem: Problem, completion: str) -> float:
    """1.0 when prompt + body passes the problem's tests in the sandbox, else 0.0."""
    return float(check_completion(dict(problem.data), body_of(completion), timeout=TIMEOUT_S)["passed"])


def prompt_ids(problem: Problem, tokenizer) -> list[int]:
    """The bare HumanEval-style prompt (signature + docstring) and BODY_START, chat template or not."""
    return list(tokenizer(problem.question + BODY_START)["input_ids"])


def sample_problem(rng: random.Random) -> Problem:
    return rng.choice(TRAIN)


TASK = Task(name="code", description=f"{len(PROBLEMS)} small Python functions with tests, run in the sandbox",
            sample=sample_problem, heldout=HELDOUT, prompt_ids=prompt_ids, reward=reward, max_new_tokens=64)
