"""The preset registry: named functions that return a `RunConfig`."""

from __future__ import annotations

from collections.abc import Callable

from poslab.lab.config import RunConfig
from poslab.registry import Registry

PRESETS: Registry[Callable[[], RunConfig]] = Registry("preset", "presets")
DESCRIPTIONS: dict[str, str] = {}


def preset(name: str, description: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    """Register a preset function under ``name`` with a one-line description."""

    def wrap(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        DESCRIPTIONS[name] = description
        return PRESETS.add(name, fn)

    return wrap


def list_presets() -> list[str]:
    return PRESETS.names()


def get_preset(name: str) -> RunConfig:
    """The `RunConfig` of preset ``name``; ValueError listing the known presets otherwise."""
    return PRESETS.lookup(name)()
