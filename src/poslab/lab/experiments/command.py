"""Subcommands as data: what a command declares so that `poslab.lab.cli` can offer it.

An experiment module lists its `Command` values in ``COMMANDS``; the command line turns each into
an argparse subcommand (argparse itself is used only there), calls ``run`` with the parsed
arguments and prints the text it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arg:
    """One argument: its names as argparse takes them (``("--out",)`` or ``("runs",)``) and the
    keyword settings of ``add_argument`` (help, default, type, choices, nargs, action, ...).
    Arguments with the same ``exclusive`` name exclude each other."""

    names: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    exclusive: str | None = None


def arg(*names: str, exclusive: str | None = None, **settings: Any) -> Arg:
    """``arg("--jobs", type=int, default=1, help=...)``."""
    return Arg(names, settings, exclusive)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``run(args)`` gets the parsed arguments (attributes named after them, and
    ``command``: the name it was called by, ``name`` or one of its ``aliases``) and returns the
    text to print; a user's mistake raises ValueError."""

    name: str
    help: str
    args: tuple[Arg, ...]
    run: Callable[[Any], str]
    aliases: tuple[str, ...] = ()


# -- arguments several commands share ---------------------------------------------------------------

OVERRIDES = arg("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=200")
RUN_FLAGS = (
    arg("--resume", action="store_true", help="continue existing run(s)", exclusive="resume"),
    arg("--overwrite", action="store_true", help="replace existing run(s)", exclusive="resume"),
    arg("--no-progress", action="store_true", help="no progress bar"),
)
THREADS = arg(
    "--threads",
    type=int,
    help="torch threads per process (default: all cores, shared between --jobs workers); set it "
    "below the core count when other work shares the machine",
)
NO_PLOTS = arg("--no-plots", action="store_true", help="skip the PNG plots")


def progress(args: Any) -> bool | None:
    """The progress bar of ``--no-progress``: off, or shown when stderr is a terminal (None)."""
    return False if args.no_progress else None


def files_line(lead: str, out: Any, files: list[Any]) -> str:
    """``<lead>report in OUT: table.md, results.csv, ...`` and a newline."""
    return f"{lead}report in {out}: {', '.join(p.name for p in files)}\n"
