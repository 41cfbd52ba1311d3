"""``poslab lm-study NAME --out DIR``: the DAPE paper's language-model studies at CPU scale.

Every part of the study (`poslab.lab.experiments.lm_studies`) trains its grid at ``OUT/<part>/runs`` and
writes its own extrapolation report in ``OUT/<part>`` (`poslab.lab.experiments.extrapolation`: scored at
L, 2L, ... up to the study's factor times L). The command resumes: finished runs are reused, and so
is a part's scoring when its results.json scored the same grid (encodings, seeds, overrides,
lengths, windows) of finished runs; delete it to rescore. ``OUT/README.md`` and ``OUT/results.csv``
gather the parts (`poslab.lab.experiments.lm_study_page`); the page ends with the reading written by hand
in ``OUT/notes.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from poslab.lab.checkpoint import check_writable, write_text
from poslab.lab.experiments.command import NO_PLOTS, THREADS, Command, arg
from poslab.lab.experiments.extrapolation import doubling_lengths, run_experiment
from poslab.lab.experiments.lm_studies import STUDIES, get_study
from poslab.lab.experiments.lm_study_page import study_csv, study_page
from poslab.lab.parsing import parse_seeds
from poslab.lab.presets import get_preset
from poslab.lab.report.common import read_notes
from poslab.lab.rundir import RunDir


def run_study(
    name: str,
    out: str | Path,
    *,
    seeds: list[int] | None = None,
    overrides: list[str] = (),
    max_windows: int | None = 8,
    train: bool = True,
    plots: bool = True,
    device: str = "auto",
    command: str = "",
) -> dict[str, Any]:
    """Train and score every part of study ``name`` under ``out`` (or, without ``train``, read the
    parts' results.json back) and write ``out/README.md`` (with the reading in ``out/notes.md``, kept
    across reruns) and ``out/results.csv``.

    Returns {"page": the README text, "results": part name -> its extrapolation result}.
    """
    study = get_study(name)
    out = Path(out)
    check_writable(out)
    seeds = list(study.seeds) if seeds is None else seeds
    specs = [spec for _, spec in study.rows]
    # Every part's config first: a bad override fails before any part trains.
    train_lens = {
        part.name: get_preset(part.preset).override([*part.overrides, *overrides]).task.train_len
        for part in study.parts
    }
    results = {}
    for part in study.parts:
        folder = out / part.name
        part_overrides = [*part.overrides, *overrides]
        train_len = train_lens[part.name]
        wanted = {
            "preset": part.preset,
            "overrides": part_overrides,
            "encodings": specs,
            "seeds": seeds,
            "lengths": doubling_lengths(train_len, train_len * study.factor),
            "max_windows": max_windows,
        }
        previous = _scored(folder, wanted)
        if train and previous is None:
            previous = run_experiment(
                part.preset,
                specs,
                seeds,
                folder,
                max_len=train_len * study.factor,
                max_windows=max_windows,
                overrides=part_overrides,
                plots=plots,
                device=device,
            )
        elif previous is None and (folder / "results.json").is_file():
            previous = json.loads((folder / "results.json").read_text())
        if previous is not None:
            results[part.name] = previous
    if not results:
        raise ValueError(f"no part of study {name!r} has results in {out}; run it without --page-only first")
    command = command or f"poslab lm-study {name} --out {out}"
    page = study_page(study, results, command=command, notes=read_notes(out))
    write_text(out / "README.md", page)
    write_text(out / "results.csv", study_csv(study, results))
    return {"page": page, "results": results}


def _scored(folder: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The part's earlier result when it scored the very grid ``wanted`` describes and all its runs
    are finished (finished runs never change, so their scores stand), else None."""
    try:
        result = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    settings = result.get("settings", {})
    if any(settings.get(key) != value for key, value in wanted.items()):
        return None
    if not all(RunDir(run["run_dir"]).is_finished() for run in result.get("runs", [])):
        return None
    return result


# -- the command -----------------------------------------------------------------------------------


def _lm_study_command(args: Any) -> str:
    if args.max_windows < 1:
        raise ValueError(f"--max-windows must be a positive integer, got {args.max_windows}")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    command = " ".join(
        ["poslab lm-study", args.name, "--out", str(args.out)]
        + (["--seeds", args.seeds] if args.seeds else [])
        + (["--max-windows", str(args.max_windows)] if args.max_windows != 8 else [])
        + list(args.overrides)
    )
    started = time.monotonic()
    result = run_study(
        args.name,
        args.out,
        seeds=seeds,
        overrides=list(args.overrides),
        max_windows=args.max_windows,
        train=not args.page_only,
        plots=not args.no_plots,
        device=args.device,
        command=command,
    )
    return result["page"] + f"\n{time.monotonic() - started:.0f} s; page in {Path(args.out) / 'README.md'}\n"


COMMANDS = (
    Command(
        "lm-study",
        "a DAPE language-model study (extrapolation, scale, D sweep, ablation): grids and one page",
        (
            arg("name", choices=tuple(STUDIES), help="the study: " + ", ".join(STUDIES)),
            arg("--out", required=True, help="output directory (one folder per part, README.md in it)"),
            arg("--seeds", help="seeds, e.g. 0,1,2 (default: the study's, 0,1,2)"),
            arg("--max-windows", type=int, default=8, help="windows per length (default 8)"),
            arg("--device", default="auto", help="auto, cpu, cuda, cuda:N"),
            arg("--page-only", action="store_true", help="train nothing; rebuild the page from the parts"),
            THREADS,
            NO_PLOTS,
            arg("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every part"),
        ),
        _lm_study_command,
    ),
)
