"""The package layering of ARCHITECTURE.md, checked on the source: no import cycle between ckaqad's modules
(imports inside functions count), and every package imports only from packages listed above it."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ckaqad"
# Top to bottom: a module may import from its own package and from those listed before it.
ORDER = ("__init__", "errors", "registry", "paths", "files", "formats", "models", "quant", "cka", "capture",
         "objectives", "data", "export", "students", "parallel", "train", "eval", "damage", "rl", "report",
         "commands", "cli", "__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """ckaqad modules imported anywhere in the file, functions included (`from ckaqad.x import y` counts
    `ckaqad.x.y` when it is a module, else `ckaqad.x`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: climb `level - 1` packages from this one
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("ckaqad"):
                found.add(target)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) - {"ckaqad"} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return ORDER.index(top)


def test_the_checker_finds_a_cycle_and_a_lazy_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ckaqad.cka import linear_cka\n")
    assert imported(source, "ckaqad.m", {"ckaqad.cka", "ckaqad.m"}) == {"ckaqad.cka"}


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_every_top_level_module_has_a_place_in_the_order():
    tops = {name.split(".")[1] for name in modules() if "." in name}
    assert tops <= set(ORDER), sorted(tops - set(ORDER))


@pytest.mark.parametrize("module", sorted(graph()))
def test_packages_import_only_from_above(module):
    edges = graph()[module]
    upward = sorted(t for t in edges if layer(t) > layer(module))
    assert upward == [], f"{module} imports from packages listed below it: {upward}"
