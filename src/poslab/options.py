"""Registries of named entries, validation of keyword options against the callable that will
receive them, and the parsers of option values (integers, comma-separated lists, seeds, lengths)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
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


# -- values from the command line ------------------------------------------------------------------


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool); ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def split_list(text: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']``: comma-separated items, stripped, empty ones dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``'rope,dape[base=fire,width=16]'`` -> 2 items."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def parse_int_list(text: str, what: str, example: str, kind: str = "integers") -> list[int]:
    """``'0,1,2'`` -> [0, 1, 2]; ValueError ``"<what> takes <kind> such as <example>, got ..."``."""
    try:
        return [int(part) for part in split_list(text)]
    except ValueError:
        raise ValueError(f"{what} takes {kind} such as {example}, got {text!r}") from None


def parse_seeds(text: str) -> list[int]:
    """``'0,1,2'`` or a range ``'0-2'`` -> [0, 1, 2] (distinct, in order)."""
    if re.fullmatch(r"\d+-\d+", text.strip()):
        low, high = map(int, text.split("-"))
        seeds = list(range(low, high + 1))
    else:
        seeds = parse_int_list(text, "--seeds", "0,1,2 or 0-2")
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds takes non-negative integers such as 0,1,2, got {text!r}")
    return list(dict.fromkeys(seeds))


def parse_lengths(text: str | Sequence[int]) -> list[int]:
    """``'128,256,512'`` (or a list) -> sorted distinct positive lengths; ValueError otherwise."""
    if isinstance(text, str):
        values: list[Any] = parse_int_list(text, "--lengths", "128,256,512", "positive integers")
    else:
        values = list(text)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"lengths must be positive integers such as 128,256,512, got {text!r}")
    return sorted(set(values))
