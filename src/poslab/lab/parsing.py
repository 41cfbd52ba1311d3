"""Parsers and checks of option values from the command line and configs: integers, comma-separated
lists, specs split at top-level commas, seeds and lengths."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


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
