"""Validation of keyword options against the callable that will receive them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


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
