"""Docstrings point at sections of docs/method.md that exist: every `docs/method.md#anchor` in the source
names a heading of that page (GitHub's anchor rule: lower case, punctuation dropped, spaces to dashes)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"docs/method\.md#([a-z0-9-]+)")


def anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def anchors() -> set[str]:
    return {anchor(line) for line in (ROOT / "docs" / "method.md").read_text().splitlines()
            if line.startswith("#")}


def references() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "ckaqad").rglob("*.py"):
        for name in REFERENCE.findall(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_anchor_rule():
    assert anchor("## CKA-QAD loss") == "cka-qad-loss"
    assert anchor("NVFP4 and the comparison formats") == "nvfp4-and-the-comparison-formats"


def test_every_reference_names_a_heading():
    refs = references()
    assert len(refs) >= 5, "the modules' docstrings should point at the method page"
    missing = {name: sorted(where) for name, where in refs.items() if name not in anchors()}
    assert missing == {}


def test_no_reference_to_the_design_note_by_section_number():
    """Section numbers of the design note drift; the docstrings link the project's own page instead."""
    stale = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "ckaqad").rglob("*.py")
             if "METHOD.md §" in p.read_text()]
    assert stale == []
