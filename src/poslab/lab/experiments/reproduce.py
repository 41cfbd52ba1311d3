"""``poslab reproduce TABLE``: train a paper table's grids and write its results page.

Every part of the table (`poslab.lab.experiments.paper_tables`) is a grid of the table's encodings x
seeds at ``OUT/<part>/<encoding>/seed<k>``. Grids always resume: finished runs (their results.json)
are kept and skipped, an interrupted run continues from its checkpoint, so a table can be built over
several sessions and machines from the small per-run files alone. ``--page-only`` trains nothing
and rebuilds the page from the runs there are.

The page, ``OUT/README.md``: the command, the setting, the machines and compute the runs recorded,
ours (mean ± sample std over seeds, and the best seed where the table asks for it) beside the
paper's numbers, every seed's value, and the reading written by hand in ``OUT/notes.md`` (kept
across rebuilds); ``OUT/results.csv`` has one row per run and column. A table with ``plot`` splits
also gets ``OUT/plots/<part>.png``, its metric per evaluated length (with matplotlib installed).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

from poslab.lab import plotting
from poslab.lab.checkpoint import check_writable, write_text
from poslab.lab.evaluate import eval_lengths
from poslab.lab.experiments.command import THREADS, Command, arg, progress
from poslab.lab.experiments.grid import GridRun, check_jobs, plan_grid, train_grid
from poslab.lab.experiments.paper_tables import TABLES, PaperTable, Part, get_table, split_at
from poslab.lab.parsing import parse_seeds
from poslab.lab.presets import get_preset
from poslab.lab.report.common import csv_value, finite, mean_std, read_notes, stats_cell

log = logging.getLogger("poslab")

SCALES = ("cpu", "paper")
UNITS = {"error": "error %", "accuracy": "accuracy %", "ppl": "perplexity"}


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
        _check_plot(table, part, config)
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


def _check_plot(table: PaperTable, part: Part, config) -> None:
    """ValueError when a split the table plots is not scored per length by ``part``'s task."""
    task = config.task.build()
    for split in table.plot:
        if split not in task.splits() or task.split_lengths(split) is None:
            raise ValueError(f"table {table.name}, part {part.name}: cannot plot {split!r} per length")


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
    plots = draw_length_plots(table, grids, out / "plots") if table.plot else {}
    page, rows = table_page(table, grids, command=command, notes=read_notes(out), plots=plots)
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
    table: PaperTable,
    grids: dict[str, list[GridRun]],
    *,
    command: str,
    notes: str | None,
    plots: dict[str, str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The page's Markdown and its per-run rows, from the finished runs of ``grids``; ``plots``:
    each part's figure, as a path relative to the page."""
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
            for split in (*part.splits, *([table.learned] if table.learned else [])):
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
    comparison = _by_part(table, rows, grids) if table.best else _comparison(table, rows)
    lines += comparison + [""] + _plot_lines(table, plots or {}) + _per_seed(table, rows, seeds) + [""]
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
            f"{t.name}({options}) {_lengths(config)}; {m.n_layers} layers, d {m.d_model}, "
            f"{m.n_heads} heads, {m.norm}-LN; {tc.steps} steps of batch {tc.batch_size}, "
            f"lr {tc.lr:g}, warm-up {tc.warmup}."
        )
    # Many parts that differ only in their name (one task each): one line with a stand-in.
    shared = {line.replace(part.name, "<part>") for part, line in zip(table.parts, lines, strict=True)}
    if len(table.parts) > 2 and len(shared) == 1:
        names = ", ".join(f"`{part.name}`" for part in table.parts)
        lines = [shared.pop().replace("- `<part>`:", f"- Each part `<part>` of {names}:", 1)]
    lines.append(f"- The paper's setting: {table.paper_setting}.")
    return lines


def _lengths(config) -> str:
    """'at length 64', or for a task that trains on a range of lengths (the Chomsky tasks) the
    training range and the lengths each length-range split is scored at."""
    if config.task.train_len is not None:
        return f"at length {config.task.train_len}"
    task = config.task.build()
    train = task.split_lengths("id")
    scored = []
    for split in config.eval.splits or task.splits():
        lengths = task.split_lengths(split)
        if lengths is not None:
            at = eval_lengths(lengths, config.eval, None)
            every = f", every {config.eval.len_stride}th" if config.eval.len_stride > 1 else ""
            scored.append(f"{split} {at[0]}-{at[-1]}{every}")
    per_length = f"{config.eval.batches} x {config.eval.batch_size} sequences a length"
    return f"trained on lengths {train[0]}-{train[-1]}, scored at {'; '.join(scored)} ({per_length})"


def _comparison(table: PaperTable, rows: list[dict[str, Any]]) -> list[str]:
    unit = UNITS.get(table.metric, table.metric)
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
            values = _values(rows, row, column)
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


def _values(rows: list[dict[str, Any]], row: str, column: str) -> list[float | None]:
    """The values of one row and column of the page, one per finished run (seed)."""
    return [r["value"] for r in rows if r["row"] == row and r["column"] == column]


def _task_table_head(table: PaperTable) -> list[str]:
    """The head of a table of one line per task, one column per row of ``table``."""
    return [
        "| level | task | chance | " + " | ".join(row for row, _ in table.rows) + " |",
        "|---|---|---|" + "---|" * len(table.rows),
    ]


def _by_part(table: PaperTable, rows: list[dict[str, Any]], grids: dict[str, list[GridRun]]) -> list[str]:
    """One line per column (its task's level and chance where the task has them), one column per
    row of the table; each cell the best seed, then mean ± sample std (n), then the paper's value."""
    unit = UNITS.get(table.metric, table.metric)
    higher = table.metric == "accuracy"
    levels = {}
    for part in table.parts:
        task = grids[part.name][0].config.task.build()
        chance = getattr(task, "chance", None)
        levels[part.name] = (
            str(getattr(task, "level", "–")).replace("_", "-"),
            "–" if chance is None else f"{chance:.0f}",
        )
    lines = [
        "## Ours beside the paper's",
        "",
        f"{unit}, {'higher' if higher else 'lower'} is better. Each cell: the best seed, then the mean ± "
        "sample std over the seeds (n), then the paper's number where there is one; the "
        "Chomsky-hierarchy papers report the best run. Chance: guessing uniformly among the task's "
        "output symbols.",
        "",
        *_task_table_head(table),
    ]
    for part in table.parts:
        level, chance_cell = levels[part.name]
        for split in part.splits:
            column = f"{part.name}/{split}"
            cells = []
            for row, _ in table.rows:
                values = _values(rows, row, column)
                stats = mean_std(values)
                known = [v for v in values if v is not None]
                cell = "–"
                if known:
                    best = max(known) if higher else min(known)
                    cell = f"**{best:.2f}** / {stats_cell(stats)} ({stats['n']})"
                paper = table.numbers.get(row, {}).get(column)
                cells.append(cell if paper is None else f"{cell} / paper {paper:g}")
            name = part.name if len(part.splits) == 1 else column
            lines.append(f"| {level} | {name} | {chance_cell} | " + " | ".join(cells) + " |")
    if table.learned is None:
        return lines
    lines += [
        "",
        f"### At the training lengths ({table.learned})",
        "",
        f"The same runs scored on split {table.learned}: {unit}, mean ± sample std over the seeds (n). "
        "Near chance here, a model did not learn the task, and its score above says nothing about "
        "extrapolation.",
        "",
        *_task_table_head(table),
    ]
    for part in table.parts:
        level, chance_cell = levels[part.name]
        column = f"{part.name}/{table.learned}"
        cells = []
        for row, _ in table.rows:
            stats = mean_std(_values(rows, row, column))
            cells.append(f"{stats_cell(stats)} ({stats['n']})" if stats["n"] else "–")
        lines.append(f"| {level} | {part.name} | {chance_cell} | " + " | ".join(cells) + " |")
    return lines


def _plot_lines(table: PaperTable, plots: dict[str, str]) -> list[str]:
    if not table.plot:
        return []
    splits = " and ".join(table.plot)
    lines = [
        "## Per length",
        "",
        f"{table.metric} at each evaluated length of {splits}, one line per encoding (the mean over the "
        "seeds); grey dotted: chance, dashed: the longest training length.",
        "",
    ]
    if not plots:
        return lines + ["_No plots: no finished runs, or matplotlib is not installed._", ""]
    return lines + [f"![{part}]({path})" for part, path in plots.items()] + [""]


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


# -- the plots -------------------------------------------------------------------------------------


def length_curves(table: PaperTable, grid: list[GridRun]) -> tuple[dict[str, dict[int, float]], int | None]:
    """Per row of ``table``, the mean over finished seeds of the metric at every length of the
    table's plot splits (lengths where every seed is missing are left out); and the last length of
    the first split (for the id split: the longest training length)."""
    per_row: dict[str, dict[int, list[float]]] = {}
    boundary = None
    for run in grid:
        if not run.run_dir.is_finished():
            continue
        lengths = run.run_dir.load_results()["metrics"].get("lengths", {})
        curve = per_row.setdefault(_row_name(table, run.config.encoding_label), {})
        for index, split in enumerate(table.plot):
            scored = {int(n): m.get(table.metric) for n, m in lengths.get(split, {}).items()}
            if index == 0 and scored:
                boundary = max(scored)
            for n, value in scored.items():
                if finite(value):
                    curve.setdefault(n, []).append(value)
    means = {
        row: {n: sum(vs) / len(vs) for n, vs in sorted(per_row[row].items())}
        for row, _ in table.rows
        if per_row.get(row)
    }
    return means, boundary


def draw_length_plots(table: PaperTable, grids: dict[str, list[GridRun]], folder: Path) -> dict[str, str]:
    """Each part's figure of `length_curves` in ``folder/<part>.png``; {part: "plots/<part>.png"},
    empty (and a warning) without matplotlib. Parts without finished runs get none."""
    if not plotting.can_plot("the per-length plots"):
        return {}
    written = {}
    for part in table.parts:
        curves, boundary = length_curves(table, grids[part.name])
        if not curves:
            continue
        task = grids[part.name][0].config.task.build()
        fig = plotting.figure(figsize=(7, 4.2))
        ax = fig.subplots()
        for row, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=row)
        if getattr(task, "chance", None) is not None:
            ax.axhline(task.chance, color="grey", linestyle=":", linewidth=1)
        if boundary is not None and len(table.plot) > 1:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("input length")
        ax.set_ylabel(UNITS.get(table.metric, table.metric))
        ax.set_title(f"{part.name} ({str(getattr(task, 'level', '')).replace('_', '-')})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        plotting.save(fig, folder / f"{part.name}.png", dpi=100)
        written[part.name] = f"{folder.name}/{part.name}.png"
    return written


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
