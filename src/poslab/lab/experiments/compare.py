"""Compare encodings on one preset: train every encoding x seed, then write the runs' results page.

    poslab compare --preset flipflop_small --encodings nope,rope,cope --seeds 0,1 --out DIR
    poslab demo    (the same on flipflop_demo with the README's encodings)

Runs go to ``DIR/<encoding>/seed<k>`` (`poslab.lab.experiments.grid`), ``DIR/grid.json`` records the
request, and the page (`poslab.lab.report.runs_page.write_report`) goes to ``DIR``.

    poslab record DIR               the finished run folders below DIR, appended to DIR/data.jsonl
    poslab report DIR/... --out DIR the page again, from the folders or the data file's records

`poslab record` keeps a grid's runs as data (`poslab.lab.report.datafile`) so that its folders can
be deleted; `poslab report` then reads the records of the runs whose folders are gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poslab.lab.checkpoint import check_writable, write_json
from poslab.lab.experiments.command import (
    NO_PLOTS,
    OVERRIDES,
    RUN_FLAGS,
    THREADS,
    Arg,
    Command,
    arg,
    files_line,
    progress,
)
from poslab.lab.experiments.grid import check_jobs, plan_grid, train_grid
from poslab.lab.parsing import parse_seeds, split_top_level
from poslab.lab.presets import DEMO_ENCODINGS, get_preset
from poslab.lab.report.datafile import StudyData, finished_folders
from poslab.lab.report.runs_page import load_runs, write_report
from poslab.lab.rundir import RunDir


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
    threads: int | None = None,
    plots: bool = True,
    progress: bool | None = None,
) -> CompareResult:
    """Train every (encoding, seed) of ``preset`` under ``out``, then write the results page."""
    out = Path(out)
    check_jobs(jobs, threads)
    check_writable(out)
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
    trained = train_grid(
        grid, resume=resume, overwrite=overwrite, jobs=jobs, threads=threads, progress=progress
    )
    report = write_report(load_runs([run.path for run in grid]), out, plots=plots)
    return CompareResult(report, len(grid), len(trained), time.monotonic() - started)


# -- commands --------------------------------------------------------------------------------------


def _compare_command(args: Any) -> str:
    encodings = split_top_level(args.encodings)
    if not encodings:
        raise ValueError("--encodings needs at least one encoding, e.g. --encodings nope,rope,cope")
    return _run(args.preset, encodings, args)


def _demo_command(args: Any) -> str:
    return _run("flipflop_demo", list(DEMO_ENCODINGS), args)


def _run(preset: str | None, encodings: list[str], args: Any) -> str:
    """Train every (encoding, seed) of the grid under ``--out``; the report's table and a summary."""
    if preset is None:
        raise ValueError("give --preset NAME (see `poslab list presets`)")
    result = compare(
        preset,
        encodings,
        parse_seeds(args.seeds),
        Path(args.out),
        overrides=list(args.overrides),
        resume=args.resume,
        overwrite=args.overwrite,
        jobs=args.jobs,
        threads=args.threads,
        plots=not args.no_plots,
        progress=progress(args),
    )
    return result.report["table"] + files_line(
        f"{result.n_runs} runs ({result.n_trained} trained) in {result.wall_time:.0f} s wall time; ",
        Path(args.out),
        result.report["files"],
    )


def _report_command(args: Any) -> str:
    check_writable(args.out)
    report = write_report(load_runs(args.runs), Path(args.out), plots=not args.no_plots)
    return report["table"] + files_line("", args.out, report["files"])


def _record_command(args: Any) -> str:
    """``poslab record DIR``: append the finished run folders below DIR to its data file."""
    folder = Path(args.dir)
    if not folder.is_dir():
        raise ValueError(f"no such directory: {folder}")
    if RunDir(folder).is_finished():
        raise ValueError(
            f"{folder} is a run folder; give the folder that holds it (its data file goes there)"
        )
    check_writable(folder)
    data = StudyData(folder)
    found = finished_folders(folder)
    if not found:
        raise ValueError(f"no finished run folders (config.json and results.json) below {folder}")
    added = data.record_runs([folder])
    return (
        f"{len(added)} run(s) recorded in {data.path} ({len(found) - len(added)} of the {len(found)} "
        f"finished folders were there already); their curves in {data.curves_path}\n"
    )


def _grid_args(default_jobs: int = 1) -> tuple[Arg, ...]:
    return (
        arg("--seeds", default="0", help="seeds: 0,1,2 or 0-2 (default 0)"),
        arg(
            "--jobs",
            type=int,
            default=default_jobs,
            help="runs trained at once, in worker processes that share the CPU cores between "
            f"them (default {default_jobs}); small models train faster this way than with "
            "several threads each",
        ),
        THREADS,
        NO_PLOTS,
    )


COMMANDS = (
    Command(
        "compare",
        "train a grid of encodings x seeds and report",
        (
            arg("--preset", help="named configuration (poslab list presets)"),
            arg("--encodings", required=True, help="comma-separated specs, e.g. nope,rope,dape[base=fire]"),
            arg("--out", required=True, help="output directory (one subdirectory per run)"),
            *_grid_args(),
            *RUN_FLAGS,
            OVERRIDES,
        ),
        _compare_command,
    ),
    Command(
        "report",
        "table and plots from existing run directories",
        (
            arg("runs", nargs="+", help="run directories, or directories holding runs"),
            arg("--out", required=True, help="where to write the report"),
            NO_PLOTS,
        ),
        _report_command,
    ),
    Command(
        "record",
        "append the finished run folders below DIR to DIR/data.jsonl (the runs as data; "
        "`report` reads them when the folders are gone)",
        (arg("dir", help="a folder of runs, e.g. a compare grid's --out"),),
        _record_command,
    ),
    Command(
        "demo",
        f"flip-flop ID/OOD with {', '.join(DEMO_ENCODINGS)} (preset flipflop_demo)",
        (
            arg("--out", default="runs/demo", help="output directory (default runs/demo)"),
            *_grid_args(default_jobs=min(2, os.cpu_count() or 1)),
            *RUN_FLAGS,
            OVERRIDES,
        ),
        _demo_command,
    ),
)
