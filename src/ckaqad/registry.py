"""`Registry[T]`: one spelling per name. Formats, export layouts, objectives, student kinds and eval suites
register here; an unknown name raises `ConfigError` listing the close matches and every valid name.

>>> layouts = Registry[int]("export layout", flag="--layout")
>>> layouts.register("modelopt", 1)
1
>>> layouts.get("modelopt")
1
>>> try:
...     layouts.get("modelop")
... except ConfigError as exc:
...     print(exc)
unknown export layout (--layout) 'modelop' (did you mean: modelopt?); choose from: modelopt
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from ckaqad.errors import ConfigError

T = TypeVar("T")


def close_matches(name: str, choices: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the closest choices, or ''."""
    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    """ConfigError for a name that is not registered, listing the valid ones."""
    choices = list(choices)
    return ConfigError(f"unknown {kind} {name!r}{close_matches(name, choices)}; choose from: "
                       f"{', '.join(sorted(choices))}")


class Registry(Generic[T]):
    """Name -> entry, in registration order. `kind` and `flag` name the thing in error messages."""

    def __init__(self, kind: str, flag: str | None = None) -> None:
        self.kind = f"{kind} ({flag})" if flag else kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated class or function."""
        return lambda entry: self.register(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[name]

    def check(self, name: str) -> str:
        """`name` itself if registered (ConfigError otherwise): for validating config fields."""
        self.get(name)
        return name

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
