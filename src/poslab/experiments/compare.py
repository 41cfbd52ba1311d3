"""Compare encodings on one preset: train every encoding x seed, then write the runs' results page.

    poslab compare --preset flipflop_small --encodings nope,rope,cope --seeds 0,1 --out DIR
    poslab demo    (the same on flipflop_demo with the README's encodings)

Runs go to ``DIR/<encoding>/seed<k>`` (`poslab.experiments.grid`), ``DIR/grid.json`` records the
request, and the page (`poslab.report.runs.write_report`) goes to ``DIR``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poslab.checkpoint import write_json
from poslab.experiments.grid import plan_grid, train_grid
from poslab.presets import get_preset
from poslab.report.runs import load_runs, write_report


@dataclass(frozen=True)
class CompareResult:
    """What `compare` did: the report (``{"table", "files", "summary"}``), the runs, how many of
    them trained in this call, and the wall time."""

    report: dict[str, Any]
    n_runs: int
    n_trained: int
    wall_time: float


def compare(
    preset: str,
    encodings: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    jobs: int = 1,
    plots: bool = True,
    progress: bool | None = None,
) -> CompareResult:
    """Train every (encoding, seed) of ``preset`` under ``out``, then write the results page."""
    out = Path(out)
    base = get_preset(preset).override(list(overrides))
    grid = plan_grid(base, encodings, seeds, out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    request = {
        "preset": preset,
        "encodings": list(encodings),
        "seeds": list(seeds),
        "overrides": list(overrides),
    }
    write_json(out / "grid.json", request)
    started = time.monotonic()
    trained = train_grid(grid, resume=resume, overwrite=overwrite, jobs=jobs, progress=progress)
    report = write_report(load_runs([run.path for run in grid]), out, plots=plots)
    return CompareResult(report, len(grid), len(trained), time.monotonic() - started)
