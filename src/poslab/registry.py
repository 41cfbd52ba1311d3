"""Registries of named entries (encodings; the lab's tasks, corpora and presets) and the check of
keyword options against the callable that will receive them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Entries of one kind (encodings, tasks, corpora) by name: a dict that refuses a second entry
    under the same name and whose ``lookup`` error lists the known names."""

    def __init__(self, kind: str, plural: str) -> None:
        super().__init__()
        self.kind, self.plural = kind, plural

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; ValueError if the name is taken."""
        if name in self:
            raise ValueError(f"{self.kind} name {name!r} is already registered")
        self[name] = entry
        return entry

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``; ValueError listing the known names otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
        return self[name]

    def build(self, name: str, **options: Any) -> Any:
        """Call the entry ``name`` with keyword ``options``, each checked against its signature."""
        entry = self.lookup(name)
        check_keyword_options(self.kind, name, entry.__init__ if isinstance(entry, type) else entry, options)
        return entry(**options)


def check_keyword_options(kind: str, name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """ValueError naming every option ``fn`` does not take as keyword-only, and the ones it does."""
    accepted = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {kind} {name!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
