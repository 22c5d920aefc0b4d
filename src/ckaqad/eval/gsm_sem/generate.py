"""Generating GSM-SEM variants: the rewrite prompts of each mode, the judge and solver prompts, and the loop
that retries each (problem, mode) until its candidate reaches the requested strictness level.

Every call's seed is `derive_seed(run seed, problem id, mode, attempt, role[, index])`, so a run replays
exactly (with the cache, without a single model call) and a new run seed gives fresh variants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

from ckaqad.errors import ConfigError
from ckaqad.eval.gsm_sem.backends import ChatBackend, Sampling, derive_seed
from ckaqad.eval.gsm_sem.checks import (
    LEVELS,
    at_least,
    deterministic_checks,
    extract_answer,
    level_reached,
    majority,
)
from ckaqad.eval.gsm_sem.data import Problem, Variant
from ckaqad.registry import Registry


@dataclass(frozen=True)
class Mode:
    """A rewrite instruction. `shows` is what the generator sees: the question, or only the worked solution
    (backward). `new_numbers` is whether the mode may change numbers (none of these does)."""

    instruction: str
    shows: str = "question"
    new_numbers: bool = False


_KEEP = ("Keep every number exactly as it is, add no new number, and keep the calculation and the final answer "
         "the same. Do not state the answer.")
MODES: Registry[Mode] = Registry("GSM-SEM mode", flag="--modes")
MODES.register("facts", Mode(
    "Write the same question changing its core facts while keeping the numbers and the core problem the same. "
    + _KEEP))
MODES.register("backward", Mode(
    "Here is a worked answer to a math word problem. Write a question for which this worked answer would be "
    "correct. Use exactly the numbers the worked answer starts from. Do not state the answer.", shows="solution"))
MODES.register("entity", Mode(
    "Rewrite the question changing its entities (the people, objects and places) to different ones. " + _KEEP))
MODES.register("attribute", Mode(
    "Rewrite the question changing the attributes of its entities (what they are, what they are like, the "
    "units they are counted in). " + _KEEP))
MODES.register("relationship", Mode(
    "Rewrite the question changing the relationships between its entities (who gives, owns, buys or makes "
    "what for whom). " + _KEEP))

JUDGE_PROMPT = ("Question:\n{question}\n\nWorked solution:\n{solution}\n\nIs this worked solution a correct "
                "solution of this question, with the facts of the question? Reply with one word: True or False.")
SOLVE_PROMPT = ("Solve this math word problem step by step. End with \"The answer is N.\" where N is a number.\n\n"
                "{question}")
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:new |rewritten |modified )?(?:question|problem)\s*:?(?:\*\*)?\s*:?\s*", re.I)
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def plain_solution(solution: str) -> str:
    """The worked solution as a reader sees it: calculator annotations `<<expr=val>>` removed."""
    return _CALCULATOR.sub("", solution)


def rewrite_messages(mode: Mode, problem: Problem) -> list[dict[str, str]]:
    shown = problem.question if mode.shows == "question" else plain_solution(problem.solution)
    label = "Question" if mode.shows == "question" else "Worked answer"
    return [{"role": "user", "content": f"{mode.instruction}\nReply with only the new question.\n\n"
                                        f"{label}:\n{shown}"}]


def clean_candidate(reply: str) -> str:
    """The question in a generator's reply: surrounding quotes, fences and a leading `Question:` label removed,
    and anything after the last question mark dropped (explanations a model appends)."""
    text = reply.strip().strip("`").strip()
    text = _LABEL.sub("", text, count=1).strip().strip('"').strip()
    cut = text.rfind("?")
    return text[:cut + 1].strip() if cut != -1 else text


def parse_vote(reply: str) -> bool:
    """A judge's True/False (the first of the two words in the reply; neither counts as False)."""
    match = re.search(r"\b(true|false|yes|no)\b", reply, re.I)
    return bool(match) and match.group(1).lower() in ("true", "yes")


@dataclass(frozen=True)
class GenerateSettings:
    """How candidates are drawn and checked (the generate command's flags)."""

    seed: int = 0
    target: str = "max"
    max_attempts: int = 3
    generator_sampling: Sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=200)
    judge_votes: int = 1
    judge_sampling: Sampling = Sampling(temperature=0.0, max_tokens=8)
    solves: int = 3
    solve_sampling: Sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=256)

    def __post_init__(self) -> None:
        if self.target not in LEVELS:
            raise ConfigError(f"--strictness must be one of {', '.join(LEVELS)}, got {self.target!r}")
        if min(self.max_attempts, self.judge_votes, self.solves) < 1:
            raise ConfigError("--max-attempts, --judge-votes and --solves must be at least 1")


def check_candidate(problem: Problem, mode_name: str, text: str, attempt: int, judges: Sequence[ChatBackend],
                    solver: ChatBackend, settings: GenerateSettings) -> Variant:
    """One candidate through the ladder: deterministic checks, then (if they pass) the judges, then (if the
    judges' majority says True) the k solves."""
    mode = MODES.get(mode_name)
    gold = Fraction(problem.gold)
    result = deterministic_checks(problem.question, problem.solution, text, gold, mode.new_numbers)
    if text.strip() and result.deterministic():
        for j, judge in enumerate(judges):
            for v in range(settings.judge_votes):
                reply = judge.chat([{"role": "user", "content": JUDGE_PROMPT.format(
                    question=text, solution=plain_solution(problem.solution))}], settings.judge_sampling,
                    derive_seed(settings.seed, problem.id, mode_name, attempt, "judge", j, v))
                result.judge_votes.append(parse_vote(reply))
        if majority(result.judge_votes) is True:
            for s in range(settings.solves):
                reply = solver.chat([{"role": "user", "content": SOLVE_PROMPT.format(question=text)}],
                                    settings.solve_sampling,
                                    derive_seed(settings.seed, problem.id, mode_name, attempt, "solve", s))
                answer = extract_answer(reply)
                result.solves.append(None if answer is None else str(answer))
    level = level_reached(text, result, gold)
    return Variant(problem, mode_name, text, level, attempt, asdict(result))


def _rank(level: str | None) -> int:
    return -1 if level is None else LEVELS.index(level)


def generate_item(problem: Problem, mode_name: str, generator: ChatBackend, judges: Sequence[ChatBackend],
                  solver: ChatBackend, settings: GenerateSettings) -> Variant:
    """The best candidate of up to `max_attempts` for (problem, mode): the first that reaches the target level,
    else the one that reached the highest level (the earliest among equals). `checks["attempt_levels"]` lists
    every attempt's level."""
    mode = MODES.get(mode_name)
    best: Variant | None = None
    levels: list[str | None] = []
    for attempt in range(settings.max_attempts):
        reply = generator.chat(rewrite_messages(mode, problem), settings.generator_sampling,
                               derive_seed(settings.seed, problem.id, mode_name, attempt, "generate"))
        candidate = check_candidate(problem, mode_name, clean_candidate(reply), attempt, judges, solver, settings)
        levels.append(candidate.level)
        if best is None or _rank(candidate.level) > _rank(best.level):
            best = candidate
        if at_least(candidate.level, settings.target):
            break
    assert best is not None  # max_attempts >= 1
    best.checks["attempt_levels"] = levels
    return best


def generate_variants(problems: Sequence[Problem], modes: Sequence[str], generator: ChatBackend,
                      judges: Sequence[ChatBackend], solver: ChatBackend, settings: GenerateSettings,
                      progress: bool = True) -> list[Variant]:
    """The best candidate of every (problem, mode), problems in order, modes in the given order."""
    from tqdm.auto import tqdm

    for name in modes:
        MODES.check(name)
    jobs = [(p, m) for p in problems for m in modes]
    return [generate_item(p, m, generator, judges, solver, settings)
            for p, m in tqdm(jobs, desc="GSM-SEM generate", disable=not progress)]


def yields(variants: Sequence[Variant]) -> dict[str, dict[str, float]]:
    """{mode or "all": {level: fraction of (problem, mode) items whose variant reached it, "n": items}}."""
    table: dict[str, dict[str, float]] = {}
    for mode in ["all", *dict.fromkeys(v.mode for v in variants)]:
        chosen = [v for v in variants if mode in ("all", v.mode)]
        row: dict[str, float] = {"n": len(chosen)}
        for level in LEVELS:
            row[level] = sum(at_least(v.level, level) for v in chosen) / max(len(chosen), 1)
        table[mode] = row
    return table
