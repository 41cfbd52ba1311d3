"""What every results page shares: mean ± std over seeds, table cells, CSV values, and writing
table.md, results.csv and results.json side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from poslab.lab.checkpoint import write_json, write_text


def finite(value: Any) -> bool:
    """A number that is not NaN or infinite (results read back from JSON hold None for those)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def mean_std(values: list[float | None]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1 in the denominator; 0 for one value) and n, ignoring
    missing and NaN values (mean and std NaN when none is left)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def stats_cell(stats: dict[str, float] | None) -> str:
    """A table cell for `mean_std`: '–' without values, 'inf' for an infinite mean, 'mean' for one
    value, else 'mean ± std'; two decimals below 1000, none above."""
    if stats is None or stats["n"] == 0:
        return "–"
    mean, std = stats["mean"], stats["std"]
    if not finite(mean):
        return "inf"
    digits = 2 if mean < 1000 else 0
    if stats["n"] == 1 or not finite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


NOTES = "notes.md"


def read_notes(out: str | Path) -> str | None:
    """The reading written by hand in ``out/notes.md`` that a results page shows, None where there
    is none (no file, or only blank lines); a file that cannot be read is a ValueError naming it."""
    path = Path(out) / NOTES
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def csv_value(value: Any) -> str:
    """A CSV cell: '' for a missing or NaN value, else the value's repr."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)


def write_page(out_dir: str | Path, *, table: str, csv: str, data: dict[str, Any]) -> list[Path]:
    """Write ``table.md``, ``results.csv`` and ``results.json`` to ``out_dir`` (created); returns
    their paths in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "table.md", out_dir / "results.csv", out_dir / "results.json"]
    write_text(files[0], table)
    write_text(files[1], csv)
    write_json(files[2], data)
    return files


NOT_RECORDED = "not recorded"
# results.json's "machine" record (`poslab.lab.provenance.machine_record`): key, column title.
PROVENANCE_FIELDS = (
    ("commit", "commit"),
    ("cpu", "CPU"),
    ("isa", "instruction set"),
    ("threads", "threads"),
    ("torch", "torch"),
)


def provenance_lines(machines: list[tuple[str, dict[str, Any] | None]], parts: list[str]) -> list[str]:
    """A Markdown table of where and with what code runs were made, from each run's (part, machine
    record): one line per distinct record with its number of runs and parts ('all' when every part
    of ``parts`` has it); a field a run did not record (older runs lack commit and isa) reads 'not
    recorded'."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for part, machine in machines:
        machine = machine or {}
        key = tuple(str(machine.get(name, NOT_RECORDED)) for name, _ in PROVENANCE_FIELDS)
        groups.setdefault(key, []).append(part)
    lines = [
        "| runs | parts | " + " | ".join(title for _, title in PROVENANCE_FIELDS) + " |",
        "|---|---|" + "---|" * len(PROVENANCE_FIELDS),
    ]
    for key, members in groups.items():
        seen = set(members)
        where = "all" if seen == set(parts) else ", ".join(p for p in parts if p in seen)
        lines.append(f"| {len(members)} | {where} | " + " | ".join(key) + " |")
    return lines
