"""GSM-SEM reports (md, html, json): generation (yields per level and mode, variants side by side with their
originals, the words that differ marked) and scoring (accuracy and drop per model with intervals, McNemar
against the first model)."""

from __future__ import annotations

import difflib
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

from ckaqad.eval.gsm_sem.checks import LEVELS
from ckaqad.eval.gsm_sem.data import Variant
from ckaqad.files import write_json, write_text
from ckaqad.report.html import markdown_page

_TOKEN = re.compile(r"\S+|\s+")


def diff_markup(original: str, variant: str) -> tuple[str, str]:
    """The two texts as HTML (escaped), the words only the original has in `<del>`, the words only the variant
    has in `<ins>` (a word-level difflib alignment)."""
    a, b = _TOKEN.findall(original), _TOKEN.findall(variant)
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        old, new = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        if op == "equal":
            left.append(old)
            right.append(new)
            continue
        if old.strip():
            left.append(f"<del>{old}</del>")
        if new.strip():
            right.append(f"<ins>{new}</ins>")
    return "".join(left), "".join(right)


def _cell(text: str) -> str:
    return text.replace("|", "&#124;").replace("\n", "<br>")


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def yield_table(table: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: per mode (and all), the share of items whose best candidate reached each level."""
    lines = ["| mode | items | " + " | ".join(LEVELS) + " |", "|---|---:|" + "---:|" * len(LEVELS)]
    for mode, row in table.items():
        lines.append(f"| {mode} | {int(row['n'])} | " + " | ".join(f"{_pct(row[lv])} %" for lv in LEVELS) + " |")
    return lines


def side_by_side(variants: Sequence[Variant], limit: int = 20) -> list[str]:
    """Markdown rows of (id, mode, level, original, variant) with the differing words marked."""
    lines = ["| problem | mode | level | original | variant |", "|---|---|---|---|---|"]
    for v in variants[:limit]:
        left, right = diff_markup(v.problem.question, v.text)
        lines.append(f"| {v.problem.id} | {v.mode} | {v.level or 'empty'} | {_cell(left)} | {_cell(right)} |")
    return lines


def write_generation_report(directory: Path, variants: Sequence[Variant], yields: dict, meta: dict) -> None:
    """gsm_sem.md, gsm_sem.html and gsm_sem.json (yields and settings; the variants are variants.jsonl)."""
    ranked = sorted(variants, key=lambda v: -(LEVELS.index(v.level) if v.level else -1))
    text = "\n".join([
        "# GSM-SEM generation", "",
        f"Source `{meta['source']}`, {meta['problems']} problems × modes {', '.join(meta['modes'])}; generator "
        f"`{meta['generator']}`, judges `{', '.join(meta['judges'])}`, solver `{meta['solver']}`; seed "
        f"{meta['seed']}, target `{meta['strictness']}`, up to {meta['max_attempts']} attempts; "
        f"{meta['runtime_s']:.0f} s ({meta['cache']}).", "",
        "## Yield per level (share of problem × mode items reaching it; levels nested)", "",
        *yield_table(yields), "", "Levels: docs/gsm_sem.md#the-strictness-ladder.", "",
        "## Variants beside their originals (strictest first; removed words struck, added words underlined)", "",
        *side_by_side(ranked), ""])
    write_text(directory / "gsm_sem.md", text)
    write_text(directory / "gsm_sem.html", markdown_page(text, "GSM-SEM generation"))
    write_json(directory / "gsm_sem.json", {"yields": yields, "meta": meta})


def _interval(ci: Sequence[float]) -> str:
    lo, hi = ci
    return "–" if math.isnan(lo) else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def score_table(models: dict[str, dict], group: str = "all") -> list[str]:
    """Markdown rows per model of one metrics group (`all`, `level:<L>`, `mode:<M>`)."""
    lines = ["| model | originals | variants | acc orig % (95% CI) | acc var % (95% CI) | drop pts (95% CI) | "
             "drop rate | P(var ✓ given orig ✓) |", "|---|---:|---:|---|---|---|---:|---:|"]
    for label, result in models.items():
        m = result["metrics"].get(group)
        if m is None:
            continue
        lines.append(f"| {label} | {m['n_orig']} | {m['n_var']} | {_pct(m['acc_orig'])} {_interval(m['acc_orig_ci'])}"
                     f" | {_pct(m['acc_var'])} {_interval(m['acc_var_ci'])} | {_pct(m['drop'])} "
                     f"{_interval(m['drop_ci'])} | {_pct(m['drop_rate'])} | {_pct(m['p_var_given_orig'])} |")
    return lines


def write_score_report(directory: Path, models: dict[str, dict], comparisons: list[dict], meta: dict) -> None:
    """score.md, score.html and score.json: per model its metrics table and per-item answers."""
    groups = list(dict.fromkeys(g for r in models.values() for g in r["metrics"]))
    lines = ["# GSM-SEM scoring", "",
             f"Variants `{meta['variants']}` at level `{meta['level']}` or stricter: {meta['n_variants']} variants "
             f"of {meta['n_originals']} originals; prompt `{meta['prompt']}`, greedy, at most {meta['max_tokens']}"
             f" new tokens; device {meta['device']}; {meta['runtime_s']:.0f} s.", "",
             *(f"Warning: {line}" for line in meta.get("warnings", [])), ""]
    for group in groups:
        lines += [f"## {group}", "", *score_table(models, group), ""]
    if comparisons:
        lines += ["## McNemar (exact) against the first model, same items", "",
                  "| model A | model B | items | only A right | only B right | p |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {c['a']} | {c['b']} | {c['items']} | {c['only_a']} | {c['only_b']} | {c['p_value']:.3g} |"
                  for c in comparisons]
    text = "\n".join(lines) + "\n"
    write_text(directory / "score.md", text)
    write_text(directory / "score.html", markdown_page(text, "GSM-SEM scoring"))
    write_json(directory / "score.json", {"models": models, "comparisons": comparisons, "meta": meta})
