"""``poslab study NAME``: train what is missing of a study and write its page.

Every part of the study (`poslab.lab.studies.declaration`) is a grid of its rows' encodings x seeds
at ``OUT/<part>/<encoding>/seed<k>`` (`poslab.lab.studies.layout`; an old LM-study folder is moved
to it first). The study's data file ``OUT/data.jsonl`` (`poslab.lab.report.datafile`) records every
finished run, and the page is built from it alone. Grids always resume: a run recorded there, or
finished in its folder, is kept and skipped, an interrupted run continues from its checkpoint, and a
finished run (recorded or in its folder) made with another config stops the command before
anything trains, so a study can be built over several sessions and machines from the data file
alone (a clean clone trains only the runs it does not record). All parts' runs train together,
``--jobs`` at a time.

Building the page first appends every finished run folder of the study's parts that the data file
does not hold yet (existing lines are never rewritten). A task table then reads each recorded run's
evaluation. An LM extrapolation study scores each part's runs at L, 2L, ... up to its factor times L
(which needs their checkpoints) and writes the part's report in ``OUT/<part>``
(`poslab.lab.experiments.extrapolation`); the data file records each scoring too, and a part's
scoring is reused when one (its folder's results.json, or one recorded) scored the same grid
(encodings, seeds, overrides, lengths, windows) of finished runs: delete both to rescore. A part's
report is written again from the recorded scoring the page uses when its folder lacks it.
``--page-only`` trains and scores nothing and rebuilds the page (`poslab.lab.studies.page`) from
what there is. ``poslab reproduce`` and ``poslab lm-study`` are the command's older names.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from poslab.lab.checkpoint import check_writable
from poslab.lab.config import RunConfig, slug
from poslab.lab.evaluate import eval_lengths
from poslab.lab.experiments.command import NO_PLOTS, THREADS, Command, arg, progress
from poslab.lab.experiments.extrapolation import score_grid
from poslab.lab.experiments.extrapolation_page import write_extrapolation_report
from poslab.lab.experiments.grid import GridRun, check_jobs, plan_grid, train_grid
from poslab.lab.parsing import parse_seeds
from poslab.lab.presets import get_preset
from poslab.lab.report.datafile import StudyData, same_json
from poslab.lab.rundir import RunDir
from poslab.lab.studies import layout
from poslab.lab.studies.declaration import STUDIES, TASK_TABLE, Part, Study, get_study, split_at
from poslab.lab.studies.page import write_page

log = logging.getLogger("poslab")

SCALES = ("cpu", "paper")
MAX_WINDOWS = 8  # an LM study's windows per length


def part_config(part: Part, scale: str, overrides: list[str] = ()) -> RunConfig:
    """The base config of a part at ``scale`` ('cpu' or 'paper'), with the part's and the caller's
    overrides."""
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "paper" and part.paper_preset is None:
        raise ValueError(f"part {part.name} has no paper-scale preset; use --scale cpu")
    preset = part.preset if scale == "cpu" else part.paper_preset
    return get_preset(preset).override([*part.overrides, *overrides])


def plan_study(
    study: Study,
    out: Path,
    seeds: list[int],
    *,
    scale: str = "cpu",
    overrides: list[str] = (),
    read_only: bool = False,
    data: StudyData | None = None,
) -> dict[str, list[GridRun]]:
    """Every part's grid, every run directory and every run recorded in ``data`` (default: the data
    file in ``out``) checked: a finished or recorded run whose config differs from the study's, or a
    column at a length the runs do not evaluate, raises ValueError before anything trains. Needs no
    run folder. ``read_only`` (a page only): runs another process is training count as unfinished."""
    data = StudyData(out) if data is None else data
    grids = {}
    for part in study.parts:
        config = part_config(part, scale, overrides)
        if study.kind == TASK_TABLE:
            _check_lengths(part, config)
            _check_plot(study, part, config)
        root = layout.part_folder(out, part.name)
        grids[part.name] = plan_grid(
            config, study.specs, seeds, root, resume=True, overwrite=False, read_only=read_only
        )
        for run in grids[part.name]:
            data.check_reusable(run.path, run.config)
    return grids


def _check_lengths(part: Part, config: RunConfig) -> None:
    """ValueError when a ``split@length`` column of ``part`` names a length its runs do not score."""
    task = config.task.build()
    for column in part.splits:
        split, length = split_at(column)
        if length is None:
            continue
        if split not in task.splits() or task.split_lengths(split) is None:
            raise ValueError(
                f"column {part.name}/{column}: split {split!r} is not scored per length by "
                f"{task.name!r} (for 'lm', set task.options.eval_lengths)"
            )
        scored = eval_lengths(task.split_lengths(split), config.eval, config.task.train_len)
        if length not in scored:
            raise ValueError(
                f"column {part.name}/{column}: the runs score {split} at {', '.join(map(str, scored))}, "
                f"not at {length}"
            )


def _check_plot(study: Study, part: Part, config: RunConfig) -> None:
    """ValueError when a split the study plots is not scored per length by ``part``'s task."""
    task = config.task.build()
    for split in study.plot:
        if split not in task.splits() or task.split_lengths(split) is None:
            raise ValueError(f"study {study.name}, part {part.name}: cannot plot {split!r} per length")


def run_study(
    name: str,
    out: str | Path,
    *,
    seeds: list[int] | None = None,
    scale: str = "cpu",
    overrides: list[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    max_windows: int = MAX_WINDOWS,
    train: bool = True,
    plots: bool = True,
    device: str = "auto",
    progress: bool | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Train (and for an LM study score) what is missing of study ``name`` under ``out``, unless
    ``train`` is False, and write its page. ``device`` is where an LM study scores.

    Returns {"page": text, "finished": runs finished, "planned": runs planned, "trained": runs
    trained now, "results": an LM study's part name -> extrapolation result}.
    """
    study = get_study(name)
    out = Path(out)
    check_jobs(jobs, threads)
    if max_windows < 1:
        raise ValueError(f"--max-windows must be a positive integer, got {max_windows}")
    check_writable(out)
    seeds = list(study.seeds) if seeds is None else seeds
    # Every part's config first: a bad override or scale fails before any part trains.
    configs = {part.name: part_config(part, scale, list(overrides)) for part in study.parts}
    layout.migrate(out, [part.name for part in study.parts])
    command = command or _command("study", study, out, seeds, scale, max_windows, overrides)
    common = {"seeds": seeds, "overrides": list(overrides), "jobs": jobs, "threads": threads, "train": train,
              "plots": plots, "progress": progress, "command": command}  # fmt: skip
    if study.kind == TASK_TABLE:
        return _run_table(study, out, scale=scale, **common)
    return _run_lm(study, out, configs, max_windows=max_windows, device=device, **common)


def _run_table(
    study: Study, out: Path, *, seeds, scale, overrides, jobs, threads, train, plots, progress, command
) -> dict[str, Any]:
    """`run_study` of a task table: every part's grid trained (but the runs the data file records),
    the finished runs recorded, then the page from the data file."""
    data = StudyData(out)
    grids = plan_study(study, out, seeds, scale=scale, overrides=overrides, read_only=not train, data=data)
    out.mkdir(parents=True, exist_ok=True)
    trained = 0
    if train:
        started = time.monotonic()
        # Seed by seed, one grid each (a grid starts its slowest runs first, which across seeds would
        # train every seed of the slowest rows before the first seed of the others), so that a study
        # stopped part-way has the same seeds of every row.
        todo = [run for grid in grids.values() for run in grid if data.get(run.path) is None]
        recorded = sum(len(grid) for grid in grids.values()) - len(todo)
        if recorded:
            log.info("%s: %d runs recorded in %s are finished", study.name, recorded, data.path)
        for seed in sorted({run.config.train.seed for run in todo}):
            batch = [run for run in todo if run.config.train.seed == seed]
            trained += len(train_grid(batch, resume=True, jobs=jobs, threads=threads, progress=progress))
        log.info("%s: %d runs trained in %.0f s", study.name, trained, time.monotonic() - started)
    data.record_runs(layout.part_folder(out, part.name) for part in study.parts)
    grids = {
        name: [GridRun(run.config, data.run_dir(run.path)) for run in grid] for name, grid in grids.items()
    }
    page = write_page(study, out, command=command, grids=grids, plots=plots)
    finished = sum(run.run_dir.is_finished() for grid in grids.values() for run in grid)
    planned = sum(len(grid) for grid in grids.values())
    return {"page": page, "finished": finished, "planned": planned, "trained": trained, "results": {}}


def _run_lm(
    study: Study,
    out: Path,
    configs: dict[str, RunConfig],
    *,
    seeds, overrides, max_windows, device, jobs, threads, train, plots, progress, command,
) -> dict[str, Any]:  # fmt: skip
    """`run_study` of an LM extrapolation study: the grids of the parts not scored yet trained
    together, then each scored (its report in ``OUT/<part>``); the finished runs and the scorings
    recorded, and the page from the data file. A part whose folder or data file holds a scoring of
    the same grid is reused as it is."""
    data = StudyData(out)
    results, todo, grid_settings = {}, {}, {}
    for part in study.parts:
        folder = layout.part_folder(out, part.name)
        train_len = configs[part.name].task.train_len
        grid_settings[part.name] = {
            "preset": part.preset,
            "overrides": [*part.overrides, *overrides],
            "encodings": study.specs,
            "seeds": seeds,
        }
        wanted = {
            **grid_settings[part.name],
            "lengths": study.scored_lengths(train_len),
            "max_windows": max_windows,
            "aligned": study.aligned,
        }
        scorings = _scorings(folder, data, part.name)
        previous = _scored(out, part.name, scorings, wanted, data)
        if train and previous is None:
            todo[part.name] = plan_grid(
                configs[part.name], study.specs, seeds, folder, resume=True, overwrite=False
            )
            for run in todo[part.name]:
                data.check_reusable(run.path, run.config)
        elif previous is None and scorings:
            previous = scorings[0]
        if previous is not None:
            results[part.name] = previous
    _check_checkpoints(todo, data)
    started = time.monotonic()
    runs = [run for grid in todo.values() for run in grid]
    trained = train_grid(runs, resume=True, jobs=jobs, threads=threads, progress=progress) if runs else []
    train_wall = time.monotonic() - started
    for name, grid in todo.items():
        results[name] = score_grid(
            [run.path for run in grid],
            layout.part_folder(out, name),
            settings={**grid_settings[name], "train_wall_time_this_call": train_wall},
            started=started,
            lengths=study.scored_lengths(configs[name].task.train_len),
            max_windows=max_windows,
            aligned=study.aligned,
            plots=plots,
            device=device,
        )
    if not results:
        raise ValueError(
            f"no part of study {study.name!r} has results in {out}; run it without --page-only first"
        )
    data.record_runs(layout.part_folder(out, part.name) for part in study.parts)
    results = {
        part.name: data.record_scoring(part.name, results[part.name])
        for part in study.parts
        if part.name in results
    }
    for name, result in results.items():
        _write_part_report(layout.part_folder(out, name), result, plots=plots)
    run_dirs = {
        name: {
            (run["encoding"], run["seed"]): data.run_dir(_run_path(out, name, run)) for run in result["runs"]
        }
        for name, result in results.items()
    }
    page = write_page(study, out, command=command, results=results, plots=plots, run_dirs=run_dirs)
    planned = len(study.parts) * len(study.rows) * len(seeds)
    finished = sum(len(result["runs"]) for result in results.values())
    return {
        "page": page,
        "finished": finished,
        "planned": planned,
        "trained": len(trained),
        "results": results,
    }


def _run_path(out: Path, part: str, run: dict[str, Any]) -> Path:
    """The folder of a scored run (``run``: an entry of a scoring's runs) in the study layout."""
    return layout.part_folder(out, part) / slug(run["encoding"]) / f"seed{run['seed']}"


def _scorings(folder: Path, data: StudyData, part: str) -> list[dict[str, Any]]:
    """A part's scorings, the newest first: its folder's results.json (a scoring not recorded yet,
    or the last one written), then those the data file records."""
    report = _read_report(folder)
    return ([] if report is None else [report]) + list(reversed(data.scorings.get(part, [])))


def _read_report(folder: Path) -> dict[str, Any] | None:
    """A part's results.json (its last scoring), None where there is none that reads."""
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _scored(
    out: Path, part: str, scorings: list[dict[str, Any]], wanted: dict[str, Any], data: StudyData
) -> dict[str, Any] | None:
    """The newest of a part's ``scorings`` that scored the very grid ``wanted`` describes, all its
    runs finished (recorded, or finished in their folders: finished runs never change, so their
    scores stand); None when there is none."""
    for result in scorings:
        settings = result.get("settings", {})
        # (scorings made before windows could be aligned have no "aligned": they were not)
        if any(
            settings.get(key, False if key == "aligned" else None) != value for key, value in wanted.items()
        ):
            continue
        runs = result.get("runs", [])
        if all(
            data.get(_run_path(out, part, run)) is not None or RunDir(run["run_dir"]).is_finished()
            for run in runs
        ):
            return result
    return None


def _check_checkpoints(todo: dict[str, list[GridRun]], data: StudyData) -> None:
    """ValueError, before anything trains, when a part to score has a recorded run whose checkpoint
    is not here (a clean clone): scoring reads every run's model."""
    for name, grid in todo.items():
        missing = [run for run in grid if data.get(run.path) is not None and not run.run_dir.has_checkpoint()]
        if missing:
            raise ValueError(
                f"part {name} must be scored, which needs the checkpoints of its {len(missing)} recorded "
                f"run(s) ({missing[0].path}, ...) that are not here; score it where they are, or "
                "delete their lines in the data file to train them again"
            )


def _write_part_report(folder: Path, result: dict[str, Any], *, plots: bool) -> None:
    """A part's extrapolation report (table.md, results.csv, results.json, plots) from ``result``
    where its folder does not hold that very scoring (a clean clone, or an earlier scoring used)."""
    if not same_json(_read_report(folder), result):
        write_extrapolation_report(result, folder, plots=plots)


def _command(
    name: str, study: Study, out: Path, seeds: list[int], scale: str, max_windows: int, overrides
) -> str:
    """The command line that makes the page, as the page shows it (``name``: the command used)."""
    parts = [f"poslab {name} {study.name} --out {out}"]
    if seeds != list(study.seeds):
        parts.append(f"--seeds {','.join(map(str, seeds))}")
    if scale != "cpu":
        parts.append(f"--scale {scale}")
    if max_windows != MAX_WINDOWS:
        parts.append(f"--max-windows {max_windows}")
    return " ".join([*parts, *overrides])


# -- the command -----------------------------------------------------------------------------------


def _study_command(args: Any) -> str:
    study = get_study(args.name)
    out = args.out or f"runs/study/{args.name}"
    seeds = parse_seeds(args.seeds) if args.seeds else list(study.seeds)
    result = run_study(
        args.name,
        out,
        seeds=seeds,
        scale=args.scale,
        overrides=list(args.overrides),
        jobs=args.jobs,
        threads=args.threads,
        max_windows=args.max_windows,
        train=not args.page_only,
        plots=not args.no_plots,
        device=args.device,
        progress=progress(args),
        command=_command(args.command, study, Path(out), seeds, args.scale, args.max_windows, args.overrides),
    )
    return (
        result["page"].split("## Every seed")[0]
        + f"{result['finished']} of {result['planned']} runs finished ({result['trained']} trained now); "
        f"page in {out}/README.md\n"
    )


COMMANDS = (
    Command(
        "study",
        "train a paper's study (its grids, resuming) and write its page: " + ", ".join(STUDIES),
        (
            arg("name", help="the study: " + ", ".join(STUDIES)),
            arg("--out", help="output directory (default runs/study/NAME)"),
            arg("--seeds", help="seeds, e.g. 0-2 (default: the study's, mostly 0-2)"),
            arg(
                "--scale",
                default="cpu",
                choices=SCALES,
                help="cpu (default) or paper (the GPU-sized presets of a task table)",
            ),
            arg("--jobs", type=int, default=2, help="runs trained at once, one process each (default 2)"),
            THREADS,
            arg(
                "--max-windows",
                type=int,
                default=MAX_WINDOWS,
                help=f"an LM study's windows per length (default {MAX_WINDOWS})",
            ),
            arg("--device", default="auto", help="where an LM study scores: auto, cpu, cuda, cuda:N"),
            arg(
                "--page-only",
                action="store_true",
                help="train and score nothing; rebuild the page from the runs there are",
            ),
            arg("--no-progress", action="store_true", help="no progress bar"),
            NO_PLOTS,
            arg("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run"),
        ),
        _study_command,
        aliases=("reproduce", "lm-study"),
    ),
)
