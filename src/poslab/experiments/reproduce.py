"""``poslab reproduce TABLE``: train a paper table's grids and write its results page.

Every part of the table (`poslab.experiments.paper_tables`) is a grid of the table's encodings x
seeds at ``OUT/<part>/<encoding>/seed<k>``. Grids always resume: finished runs (their results.json)
are kept and skipped, an interrupted run continues from its checkpoint, so a table can be built over
several sessions and machines from the small per-run files alone. ``--page-only`` trains nothing
and rebuilds the page from the runs there are.

The page, ``OUT/README.md``: the command, the setting, the machines and compute the runs recorded,
ours (mean ± sample std over seeds) beside the paper's numbers, every seed's value, and the reading
written by hand in ``OUT/notes.md`` (kept across rebuilds); ``OUT/results.csv`` has one row per run.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

from poslab.checkpoint import check_writable, write_text
from poslab.evaluate import eval_lengths
from poslab.experiments.command import THREADS, Command, arg, progress
from poslab.experiments.grid import GridRun, check_jobs, plan_grid, train_grid
from poslab.experiments.paper_tables import TABLES, PaperTable, Part, get_table, split_at
from poslab.options import parse_seeds
from poslab.presets import get_preset
from poslab.report.common import csv_value, finite, mean_std, stats_cell

log = logging.getLogger("poslab")

NOTES = "notes.md"
SCALES = ("cpu", "paper")


def part_config(part: Part, scale: str, overrides: list[str] = ()):
    """The base config of a part at ``scale`` ('cpu' or 'paper'), with the part's and the caller's
    overrides."""
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    preset = part.cpu if scale == "cpu" else part.paper
    return get_preset(preset).override([*part.overrides, *overrides])


def plan_table(
    table: PaperTable, out: Path, seeds: list[int], *, scale: str = "cpu", overrides: list[str] = ()
) -> dict[str, list[GridRun]]:
    """Every part's grid, every run directory checked (a finished run whose config differs from the
    table's, or a column at a length the runs do not evaluate, raises ValueError before anything
    trains)."""
    specs = [spec for _, spec in table.rows]
    grids = {}
    for part in table.parts:
        config = part_config(part, scale, overrides)
        _check_lengths(part, config)
        grids[part.name] = plan_grid(config, specs, seeds, out / part.name, resume=True, overwrite=False)
    return grids


def _check_lengths(part: Part, config) -> None:
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


def reproduce(
    name: str,
    out: str | Path,
    *,
    seeds: list[int] | None = None,
    scale: str = "cpu",
    overrides: list[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    train: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train what is missing of table ``name`` under ``out`` (unless ``train`` is False) and write its
    page; returns {"page": text, "finished": runs finished, "planned": runs planned, "trained": ...}."""
    table = get_table(name)
    out = Path(out)
    check_jobs(jobs, threads)
    check_writable(out)
    seeds = list(table.seeds) if seeds is None else seeds
    grids = plan_table(table, out, seeds, scale=scale, overrides=list(overrides))
    out.mkdir(parents=True, exist_ok=True)
    trained = 0
    if train:
        todo = [run for grid in grids.values() for run in grid]
        started = time.monotonic()
        trained = len(train_grid(todo, resume=True, jobs=jobs, threads=threads, progress=progress))
        log.info("%s: %d runs trained in %.0f s", name, trained, time.monotonic() - started)
    command = _command(name, out, seeds, table, scale, overrides)
    page, rows = table_page(table, grids, command=command, notes=_read_notes(out))
    write_text(out / "README.md", page)
    write_text(out / "results.csv", _csv(rows))
    finished = sum(run.run_dir.is_finished() for grid in grids.values() for run in grid)
    planned = sum(len(grid) for grid in grids.values())
    return {"page": page, "finished": finished, "planned": planned, "trained": trained}


def _command(name: str, out: Path, seeds: list[int], table: PaperTable, scale: str, overrides) -> str:
    parts = [f"poslab reproduce {name} --out {out}"]
    if seeds != list(table.seeds):
        parts.append(f"--seeds {','.join(map(str, seeds))}")
    if scale != "cpu":
        parts.append(f"--scale {scale}")
    parts += list(overrides)
    return " ".join(parts)


def _read_notes(out: Path) -> str | None:
    path = out / NOTES
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


# -- the page --------------------------------------------------------------------------------------


def _value(results: dict[str, Any], split: str, metric: str) -> float | None:
    """``metric`` of a column's ``split`` (``"validation"`` or ``"validation@320"``) in a run's
    results, None where the run has none (not evaluated there, or NaN)."""
    name, length = split_at(split)
    metrics = results["metrics"]
    if length is None:
        value = metrics["splits"].get(name, {}).get(metric)
    else:
        value = metrics.get("lengths", {}).get(name, {}).get(str(length), {}).get(metric)
    return value if finite(value) else None


def table_page(
    table: PaperTable, grids: dict[str, list[GridRun]], *, command: str, notes: str | None
) -> tuple[str, list[dict[str, Any]]]:
    """The page's Markdown and its per-run rows, from the finished runs of ``grids``."""
    rows: list[dict[str, Any]] = []  # one per finished run and column
    missing: list[str] = []
    machines: dict[str, int] = {}
    wall = 0.0
    for part in table.parts:
        for run in grids[part.name]:
            if not run.run_dir.is_finished():
                missing.append(str(run.path))
                continue
            results = run.run_dir.load_results()
            wall += float(results.get("wall_time") or 0.0)
            machine = results.get("machine") or {}
            key = f"{machine.get('cpu', 'not recorded')}, {machine.get('threads', '?')} thread(s)"
            machines[key] = machines.get(key, 0) + 1
            for split in part.splits:
                rows.append(
                    {
                        "row": _row_name(table, run.config.encoding_label),
                        "encoding": run.config.encoding_label,
                        "column": f"{part.name}/{split}",
                        "seed": run.config.train.seed,
                        "value": _value(results, split, table.metric),
                        "wall_time": results.get("wall_time"),
                        "run_dir": str(run.path),
                    }
                )
    planned = sum(len(grid) for grid in grids.values())
    lines = [f"# {table.title}", "", f"Reproduces the {table.source} at CPU scale. Made by", ""]
    lines += ["```", command, "```", ""]
    lines += _setting_lines(table, grids)
    seeds = sorted({run.config.train.seed for grid in grids.values() for run in grid})
    lines += [
        f"- Seeds: {', '.join(map(str, seeds))}; {planned - len(missing)} of {planned} runs finished.",
        f"- Compute: {wall / 3600:.2f} h, the sum of the finished runs' training wall times "
        "(each run one process; grids run two at a time on 2 cores).",
        "- Machines (from the runs' results.json): "
        + "; ".join(f"{name} ({count} runs)" for name, count in machines.items()),
        "",
    ]
    if missing:
        lines += [f"**Incomplete**: {len(missing)} runs not finished; rerun the command to finish them.", ""]
    lines += _comparison(table, rows) + [""] + _per_seed(table, rows, seeds) + [""]
    lines += ["## Reading", "", notes or "_Not written yet._", ""]
    return "\n".join(lines), rows


def _row_name(table: PaperTable, spec: str) -> str:
    return next(row for row, s in table.rows if s == spec)


def _setting_lines(table: PaperTable, grids: dict[str, list[GridRun]]) -> list[str]:
    lines = []
    for part in table.parts:
        config = grids[part.name][0].config
        m, t, tc = config.model, config.task, config.train
        options = ", ".join(f"{k}={v}" for k, v in t.options.items())
        with_overrides = f" with {' '.join(part.overrides)}" if part.overrides else ""
        lines.append(
            f"- `{part.name}`: preset `{part.cpu}`{with_overrides} (paper scale: `{part.paper}`): "
            f"{t.name}({options}) at length {t.train_len}; {m.n_layers} layers, d {m.d_model}, "
            f"{m.n_heads} heads, {m.norm}-LN; {tc.steps} steps of batch {tc.batch_size}, "
            f"lr {tc.lr:g}, warm-up {tc.warmup}."
        )
    lines.append(f"- The paper's setting: {table.paper_setting}.")
    return lines


def _comparison(table: PaperTable, rows: list[dict[str, Any]]) -> list[str]:
    unit = {"error": "error %", "accuracy": "accuracy %", "ppl": "perplexity"}.get(table.metric, table.metric)
    better = "higher" if table.metric == "accuracy" else "lower"
    ratio_head = " | ratio ours | ratio paper" if table.ratio is not None else ""
    lines = [
        "## Ours beside the paper's",
        "",
        f"{unit}, {better} is better; ours: mean ± sample std over the seeds (n), the paper's: one number.",
        "",
        "| encoding | " + " | ".join(f"{c} ours | {c} paper" for c in table.columns) + ratio_head + " |",
        "|---|" + "---|---|" * (len(table.columns) + (table.ratio is not None)),
    ]
    for row, _ in table.rows:
        cells = []
        for column in table.columns:
            values = [r["value"] for r in rows if r["row"] == row and r["column"] == column]
            stats = mean_std(values)
            ours = f"{stats_cell(stats)} ({stats['n']})" if stats["n"] else "–"
            paper = table.numbers.get(row, {}).get(column)
            cells += [ours, "–" if paper is None else f"{paper:g}"]
        if table.ratio is not None:
            cells += _ratio_cells(table, row, rows)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if table.ratio is not None:
        lines += [
            "",
            f"ratio: {table.ratio[0]} / {table.ratio[1]}, below 1 where the {unit} is lower at "
            f"{table.ratio[0]}; ours: each seed's ratio, then mean ± sample std (n).",
        ]
    return lines


def _ratio_cells(table: PaperTable, row: str, rows: list[dict[str, Any]]) -> list[str]:
    """Ours (each seed's ratio of the two columns, then mean ± std) and the paper's ratio."""
    top, bottom = table.ratio
    by_seed = {column: {} for column in table.ratio}
    for r in rows:
        if r["row"] == row and r["column"] in by_seed and r["value"] is not None:
            by_seed[r["column"]][r["seed"]] = r["value"]
    stats = mean_std([v / by_seed[bottom][s] for s, v in by_seed[top].items() if by_seed[bottom].get(s)])
    ours = f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['n']})" if stats["n"] else "–"
    paper = table.numbers.get(row, {})
    both = top in paper and bottom in paper
    return [ours, f"{paper[top] / paper[bottom]:.3f}" if both else "–"]


def _per_seed(table: PaperTable, rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    lines = [
        "## Every seed",
        "",
        "| encoding | column | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for row, _ in table.rows:
        for column in table.columns:
            by_seed = {r["seed"]: r["value"] for r in rows if r["row"] == row and r["column"] == column}
            cells = ["–" if by_seed.get(s) is None else f"{by_seed[s]:.2f}" for s in seeds]
            lines.append(f"| {row} | {column} | " + " | ".join(cells) + " |")
    return lines


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    head = ["row", "encoding", "column", "seed", "value", "wall_time", "run_dir"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    for r in rows:
        writer.writerow([csv_value(r[k]) if k in ("value", "wall_time") else r[k] for k in head])
    return out.getvalue()


# -- the command -----------------------------------------------------------------------------------


def _reproduce_command(args: Any) -> str:
    out = args.out or f"runs/reproduce/{args.table}"
    result = reproduce(
        args.table,
        out,
        seeds=parse_seeds(args.seeds) if args.seeds else None,
        scale=args.scale,
        overrides=list(args.overrides),
        jobs=args.jobs,
        threads=args.threads,
        train=not args.page_only,
        progress=progress(args),
    )
    return (
        result["page"].split("## Every seed")[0]
        + f"{result['finished']} of {result['planned']} runs finished ({result['trained']} trained now); "
        f"page in {out}/README.md\n"
    )


COMMANDS = (
    Command(
        "reproduce",
        "train a paper table's grids (resuming) and write its page: " + ", ".join(TABLES),
        (
            arg("table", help="the table: " + ", ".join(TABLES)),
            arg("--out", help="output directory (default runs/reproduce/TABLE)"),
            arg("--seeds", help="seeds, e.g. 0-2 (default: the table's, 0-2)"),
            arg(
                "--scale",
                default="cpu",
                choices=SCALES,
                help="cpu (default) or paper (the GPU-sized presets)",
            ),
            arg("--jobs", type=int, default=2, help="runs trained at once, one process each (default 2)"),
            THREADS,
            arg(
                "--page-only",
                action="store_true",
                help="train nothing; rebuild the page from the runs there are",
            ),
            arg("--no-progress", action="store_true", help="no progress bar"),
            arg("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run"),
        ),
        _reproduce_command,
    ),
)
