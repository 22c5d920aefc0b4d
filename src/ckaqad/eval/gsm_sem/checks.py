"""The checks of a GSM-SEM variant and the strictness ladder (docs/gsm_sem.md#the-strictness-ladder).

Deterministic checks run first and cost nothing; the model checks (judge votes, independent solves) run only
on a candidate that passed them. The six levels carry the names of the released GSM-SEM labels and are
nested: a candidate at `max` is at every level below it.

- `none`: the generator returned a non-empty candidate;
- `min`: the gold solution's every `<<expr=val>>` evaluates to `val`, the candidate is a question, does not
  leak the gold answer, and its length is within `LENGTH_RATIO` of the original's;
- `min-med`: it keeps every number of the original and adds none (unless its mode allows new numbers), and
  its word novelty against the original is within `NOVELTY`;
- `med`: a strict majority of the judge votes say the gold solution answers the variant;
- `med-max`: the majority answer of the k independent solves equals the gold answer;
- `max`: every judge vote and every solve agrees.

The arithmetic of the gold solutions is evaluated by `safe_eval` (an AST walk over numbers and + - * / // %
and bounded **, in exact fractions), never by `eval`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

LEVELS: tuple[str, ...] = ("none", "min", "min-med", "med", "med-max", "max")
"""The strictness levels, lowest first; each includes every check of the levels before it."""
LENGTH_RATIO = (0.5, 2.0)
"""Allowed variant/original word-count ratio: a rewrite of the same problem has about its length."""
NOVELTY = (0.15, 0.9)
"""Allowed word novelty (1 − Jaccard similarity of the word sets): below, the text is a near copy and changes
no fact; above, it shares almost no wording with the problem it should rewrite."""
MAX_EXPONENT = 64  # `**` beyond this in a gold calculation is not grade-school arithmetic (and could be huge)

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?|(?<![\w.])-?\.\d+")
_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_WORD_NUMBERS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100, "thousand": 1000, "dozen": 12, "twice": 2, "half": Fraction(1, 2),
                      "double": 2, "triple": 3, "thrice": 3})
_WORD = re.compile(r"[a-z]+")
_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def parse_number(text: str) -> Fraction | None:
    """A number as GSM8K writes one (`1,200`, `$3.50`, `-2`, `7/2`, `50%` is 50) as an exact fraction, or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".").strip()
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_in(text: str, words: bool = True) -> set[Fraction]:
    """Every number written in `text`, in digits (commas allowed) and, with `words`, in words (`three`,
    `dozen`, `half`, `twice`), as exact fractions. Digits glued to letters (`5th`, `x2`) are not counts and
    are left out."""
    found = {value for m in _NUMBER.finditer(text)
             if (value := parse_number(m.group())) is not None and not text[m.end():m.end() + 1].isalpha()}
    if words:
        found |= {Fraction(_WORD_NUMBERS[w]) for w in _WORD.findall(text.lower()) if w in _WORD_NUMBERS}
    return found


# ---------------------------------------------------------------------------------------- safe arithmetic

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


class UnsafeExpression(ValueError):
    """An expression `safe_eval` does not evaluate: anything but numbers and arithmetic operators."""


def safe_eval(expression: str) -> Fraction:
    """The exact value of an arithmetic expression over numbers (+ - * / // % **, parentheses, unary signs).

    >>> safe_eval("16-3-4"), safe_eval("3*.5"), safe_eval("(1+2)/4")
    (Fraction(9, 1), Fraction(3, 2), Fraction(3, 4))

    Raises UnsafeExpression for names, calls, attributes, an exponent above MAX_EXPONENT or a division by zero.
    GSM8K writes `x` for times and `%` after a number as percent in a few calculations: `3x4` and `50%` are
    read as 3*4 and 50/100.
    """
    text = expression.replace(",", "").replace("$", "").replace("x", "*").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(\d*\.?\d+)%(?!\s*[\d(.])", r"(\1/100)", text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise UnsafeExpression(f"not an arithmetic expression: {expression!r}") from exc

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                    bool):
            return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            try:
                return Fraction(_BINARY[type(node.op)](left, right))
            except ZeroDivisionError as exc:
                raise UnsafeExpression(f"division by zero in {expression!r}") from exc
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exponent = walk(node.left), walk(node.right)
            if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT or (base == 0 and exponent < 0):
                raise UnsafeExpression(f"exponent {exponent} not evaluated in {expression!r}")
            return base ** int(exponent)
        raise UnsafeExpression(f"{type(node).__name__} is not arithmetic, in {expression!r}")

    return walk(tree.body)


def matches_shown(value: Fraction, shown: Fraction, decimals: int) -> bool:
    """`value` equals `shown` as written with `decimals` places: exactly, rounded half up, or truncated
    (GSM8K's annotators did both)."""
    if value == shown:
        return True
    scale = Fraction(10) ** decimals
    rounded = Fraction(int(abs(value) * scale + Fraction(1, 2)), 1) / scale * (1 if value >= 0 else -1)
    truncated = Fraction(int(abs(value) * scale), 1) / scale * (1 if value >= 0 else -1)
    return shown in (rounded, truncated)


def check_calculations(solution: str) -> list[str]:
    """The problems with the `<<expr=val>>` calculations of a worked solution (empty: all evaluate to their
    shown value, within the decimals shown)."""
    problems = []
    for expr, shown_text in _CALC.findall(solution):
        shown = parse_number(shown_text)
        if shown is None:
            problems.append(f"<<{expr}={shown_text}>>: the result is not a number")
            continue
        try:
            value = safe_eval(expr)
        except UnsafeExpression as exc:
            problems.append(str(exc))
            continue
        digits = shown_text.strip().rstrip("%").replace(",", "")
        decimals = len(digits.partition(".")[2]) if "." in digits else 0
        if not matches_shown(value, shown, decimals):
            problems.append(f"<<{expr}={shown_text}>>: evaluates to {float(value):g}")
    return problems


# ----------------------------------------------------------------------------------- deterministic checks


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def novelty(original: str, variant: str) -> float:
    """1 − Jaccard similarity of the two texts' lower-cased word sets (0: the same words; 1: none shared)."""
    a, b = set(words(original)), set(words(variant))
    return 1.0 - len(a & b) / max(len(a | b), 1)


def is_question(text: str) -> bool:
    """The text asks something: a sentence ending in `?` (GSM8K problems all end in one)."""
    return "?" in text.strip()[-200:] and bool(words(text))


@dataclass
class CheckResult:
    """Every check of one candidate: deterministic ones, then the model checks (filled when they ran)."""

    calculations: list[str] = field(default_factory=list)
    question: bool = False
    leak: bool = False
    length_ratio: float = 0.0
    numbers_missing: list[str] = field(default_factory=list)
    numbers_added: list[str] = field(default_factory=list)
    novelty: float = 0.0
    judge_votes: list[bool] = field(default_factory=list)
    solves: list[str | None] = field(default_factory=list)  # each solve's extracted answer, exact fraction text

    def minimal(self) -> bool:
        lo, hi = LENGTH_RATIO
        return not self.calculations and self.question and not self.leak and lo <= self.length_ratio <= hi

    def numbers_and_novelty(self) -> bool:
        lo, hi = NOVELTY
        return not self.numbers_missing and not self.numbers_added and lo <= self.novelty <= hi

    def deterministic(self) -> bool:
        return self.minimal() and self.numbers_and_novelty()


def deterministic_checks(original: str, solution: str, variant: str, gold: Fraction,
                         new_numbers_allowed: bool = False) -> CheckResult:
    """The checks of `min` and `min-med` for `variant`, a rewrite of `original` whose answer should be `gold`
    by the worked `solution`. The gold answer leaks when it is written in the variant but not in the
    original. With `new_numbers_allowed` (a mode that changes numbers) the number checks are skipped."""
    orig_numbers, var_numbers = numbers_in(original), numbers_in(variant)
    result = CheckResult(
        calculations=check_calculations(solution),
        question=is_question(variant),
        leak=gold in numbers_in(variant, words=False) and gold not in numbers_in(original, words=False),
        length_ratio=len(words(variant)) / max(len(words(original)), 1),
        novelty=novelty(original, variant))
    if not new_numbers_allowed:
        # Word numbers are compared only as far as digits cover them: "three" in the original may be written 3
        digit_orig, digit_var = numbers_in(original, words=False), numbers_in(variant, words=False)
        result.numbers_missing = sorted(str(n) for n in digit_orig - var_numbers)
        result.numbers_added = sorted(str(n) for n in digit_var - orig_numbers)
    return result


def majority(values: Sequence) -> object | None:
    """The value more than half of `values` share, or None (no strict majority, or no values)."""
    if not values:
        return None
    value, count = Counter(values).most_common(1)[0]
    return value if count * 2 > len(values) else None


def level_reached(text: str, result: CheckResult, gold: Fraction) -> str | None:
    """The highest level of LEVELS the candidate reaches (None: not even `none`, an empty candidate).
    Model checks that did not run count as failed."""
    if not text.strip():
        return None
    if not result.minimal():
        return "none"
    if not result.numbers_and_novelty():
        return "min"
    if majority(result.judge_votes) is not True:
        return "min-med"
    gold_text = str(gold)
    if majority(result.solves) != gold_text:
        return "med"
    if all(result.judge_votes) and all(s == gold_text for s in result.solves):
        return "max"
    return "med-max"


def at_least(level: str | None, wanted: str) -> bool:
    """`level` is `wanted` or stricter."""
    return level is not None and LEVELS.index(level) >= LEVELS.index(wanted)


# ------------------------------------------------------------------------------------------ answer extraction

_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)")
_THE_ANSWER = re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)")
_ANY_NUMBER = re.compile(r"-?[\d,]*\.?\d+(?:/\d+)?")


def extract_answer(text: str) -> Fraction | None:
    """The answer a solution states: the number after the first `####`, else after the first "The answer is",
    else the last number in the text; None when there is none. Compared with the gold as exact fractions
    (`1,000` is 1000, `$18.00` is 18, `7/2` is 3.5).

    >>> extract_answer("9 * 2 = 18 eggs.\\n#### 18"), extract_answer("So the answer is 1,000."), extract_answer("x")
    (Fraction(18, 1), Fraction(1000, 1), None)
    """
    for pattern in (_HASHES, _THE_ANSWER):
        match = pattern.search(text)
        if match and (value := parse_number(match.group(1))) is not None:
            return value
    for candidate in reversed(_ANY_NUMBER.findall(text)):
        if (value := parse_number(candidate)) is not None:
            return value
    return None
