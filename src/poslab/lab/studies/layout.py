"""The folders of a study, and the migration of the old LM-study layout.

A study's output folder ``OUT`` holds its page (``README.md``, ``results.csv``, ``notes.md``, the
reading written by hand, and ``plots/`` where the page draws some), its data file and one folder per
part:

    OUT/data.jsonl, curves.jsonl.gz   every finished run (and LM part's scoring) recorded, from which
                                      the page is built (`poslab.lab.report.datafile`)
    OUT/<part>/<encoding>/seed<k>     one run (`poslab.lab.experiments.grid`'s layout); not needed
                                      once recorded, but for its checkpoint
    OUT/<part>/results.json, ...      an LM-extrapolation part's own report (table.md, results.csv,
                                      results.json, ppl_*.png: `poslab.lab.experiments.extrapolation`)

Until the studies were one concept, the DAPE language-model studies kept their runs one level
deeper, at ``OUT/<part>/runs/<encoding>/seed<k>``. `migrate` moves such runs up to the layout above
and rewrites the run directories recorded in the part's results.json and results.csv, so an old
folder loads as it is; every study runs it before it reads or trains anything.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from poslab.lab.checkpoint import write_json, write_text

log = logging.getLogger("poslab")

OLD_RUNS = "runs"  # the folder the old layout kept a part's runs in


def part_folder(out: str | Path, part: str) -> Path:
    """Where part ``part`` of a study in ``out`` keeps its runs (and, for LM extrapolation, its report)."""
    return Path(out) / part


def migrate(out: str | Path, parts: list[str]) -> list[Path]:
    """Move each part's runs from ``OUT/<part>/runs/<encoding>`` to ``OUT/<part>/<encoding>`` and
    rewrite the paths in the part's results.json and results.csv; returns the folders moved (none
    for a folder in the current layout). ValueError, before anything moves, when an encoding's
    folder exists in both places."""
    moves = []
    for part in parts:
        old = part_folder(out, part) / OLD_RUNS
        if not old.is_dir():
            continue
        for source in sorted(p for p in old.iterdir() if p.is_dir()):
            target = part_folder(out, part) / source.name
            if target.exists():
                raise ValueError(
                    f"{source} (the old layout) and {target} both exist; keep one of them and rerun"
                )
            moves.append((source, target))
    for source, target in moves:
        source.rename(target)
        log.info("moved %s to %s (the study layout)", source, target)
    for part in {source.parent.parent.name for source, _ in moves}:
        old = part_folder(out, part) / OLD_RUNS
        if not any(old.iterdir()):
            old.rmdir()
        _rewrite_report(part_folder(out, part))
    return [target for _, target in moves]


def new_run_dir(run_dir: str) -> str:
    """A run directory recorded in the old layout (``.../<part>/runs/<encoding>/seed<k>``) as it
    is in the study layout (``.../<part>/<encoding>/seed<k>``); others unchanged."""
    parts = Path(run_dir).parts
    if len(parts) >= 3 and parts[-3] == OLD_RUNS:
        return str(Path(*parts[:-3], *parts[-2:]))
    return run_dir


def _rewrite_report(folder: Path) -> None:
    """The run directories in an LM-extrapolation part's results.json and results.csv, moved."""
    if (folder / "results.json").is_file():
        result = json.loads((folder / "results.json").read_text())
        for run in result.get("runs", []):
            run["run_dir"] = new_run_dir(run["run_dir"])
        write_json(folder / "results.json", result)
    if (folder / "results.csv").is_file():
        rows = list(csv.reader(io.StringIO((folder / "results.csv").read_text())))
        if rows and "run_dir" in rows[0]:
            at = rows[0].index("run_dir")
            for row in rows[1:]:
                row[at] = new_run_dir(row[at])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        write_text(folder / "results.csv", text.getvalue())
