"""A study's page: ``OUT/README.md`` and ``OUT/results.csv``, for either kind of study.

Every page starts with the title, the command that made it, the setting and the provenance of its
runs (commit, CPU, instruction set, threads and torch, from each run's results.json), and ends with
the reading written by hand in ``OUT/notes.md`` (kept across rebuilds, `report.common.read_notes`).
The paper's numbers are marked where they were not verified against a primary copy
(``Study.numbers_check``). Every comparison of two rows the reading makes (``Study.pairs``, and
``reference``) is shown as a paired difference over seeds with its 95% interval and seed wins
(`poslab.lab.report.stats`).

A task table's page (`table_page`): the compute the runs recorded, ours (mean ± sample std over
seeds, and the best seed where the study asks for it) beside the paper's numbers, the paired
differences, every seed's value; its results.csv has one row per run and column. A study with
``plot`` splits also gets ``OUT/plots/<part>.png``, its metric per evaluated length, and one with
``bars`` ``OUT/plots/columns.png``, every column's seeds and means beside the paper's (with
matplotlib installed). A table with best seeds (the Chomsky hierarchy) gives each task's chance and
the floor of a model blind to positions (`position_blind_floor`).

An LM extrapolation study's page (`lm_page`), from its parts' extrapolation results
(`poslab.lab.experiments.extrapolation`): wall time, seeds, the last-256-token perplexity per part
and length (mean ± sample std and every seed at the longest length), the paired differences per
length, each part's plot (redrawn), the paper's numbers beside ours at the same multiple of the
training length, and, where the study names two rows, their gap at the longest length per part,
paired by seed; its results.csv has one row per part, run and length.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslab.lab import plotting
from poslab.lab.checkpoint import write_text
from poslab.lab.evaluate import eval_lengths, evaluate
from poslab.lab.experiments.extrapolation_page import plot_extrapolation
from poslab.lab.experiments.grid import GridRun
from poslab.lab.report.common import (
    csv_value,
    finite,
    mean_std,
    provenance_lines,
    read_notes,
    stats_cell,
)
from poslab.lab.report.stats import difference_cell, interval, paired_difference, runs_past
from poslab.lab.rundir import RunDir
from poslab.lab.studies.declaration import TASK_TABLE, Part, Study, split_at

UNITS = {"error": "error %", "accuracy": "accuracy %", "ppl": "perplexity"}
# The range a metric can take: an interval of its mean is cut to it (Student's t knows no bounds,
# and with a few seeds that split between learning a task and not, it runs far past 0 or 100).
RANGES = {"error": (0.0, 100.0), "accuracy": (0.0, 100.0)}
# An LM study's runs: part -> (encoding, seed) -> the run (a `RunDir`, or one a data file records).
RunDirs = dict[str, dict[tuple[str, int], RunDir]]
BARS = "plots/columns.png"  # a table's figure of every column (`draw_bars`), relative to the page
UNVERIFIED = "*"  # the mark of a paper's number not verified against a primary copy


def write_page(
    study: Study,
    out: Path,
    *,
    command: str,
    grids: dict[str, list[GridRun]] | None = None,
    results: dict[str, dict[str, Any]] | None = None,
    plots: bool = True,
    run_dirs: RunDirs | None = None,
) -> str:
    """Write ``out/README.md`` and ``out/results.csv`` of ``study`` and return the page: a task
    table's from its parts' ``grids`` (and, with ``plots``, its figures in ``out/plots``), an LM
    extrapolation study's from its parts' extrapolation ``results`` and their runs' ``run_dirs``
    (`RunDirs`; default: the folders the results name), and, with ``plots``, each part's perplexity
    figures in ``out/<part>``, redrawn from the results."""
    notes = read_notes(out)
    if study.kind == TASK_TABLE:
        figures = draw_length_plots(study, grids, out / "plots") if study.plot and plots else {}
        maps = draw_depth_maps(study, grids, out / "plots") if plots else {}
        bars = BARS if study.bars and plots and plotting.can_plot("the column figure") else None
        page, rows = table_page(
            study, grids, command=command, notes=notes, plots=figures, maps=maps, bars=bars
        )
        if bars is not None:
            draw_bars(study, rows, out / bars)
        csv_text = table_csv(rows)
    else:
        page = lm_page(study, results, command=command, notes=notes, run_dirs=run_dirs)
        csv_text = lm_csv(study, results)
        if plots:  # each part's figures, redrawn from its results (one line style per row)
            for name, result in results.items():
                for metric in ("ppl_last", "ppl_all"):
                    plot_extrapolation(result, out / name / f"{metric}.png", metric=metric)
    write_text(out / "README.md", page)
    write_text(out / "results.csv", csv_text)
    return page


# -- a task table ----------------------------------------------------------------------------------


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
    study: Study,
    grids: dict[str, list[GridRun]],
    *,
    command: str,
    notes: str | None,
    plots: dict[str, str] | None = None,
    maps: dict[str, str] | None = None,
    bars: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The page's Markdown and its per-run rows, from the finished runs of ``grids``; ``plots``:
    each part's figure, ``maps``: each depth x length heat map (`draw_depth_maps`), ``bars``: the
    figure of every column (`draw_bars`), as paths relative to the page."""
    rows: list[dict[str, Any]] = []  # one per finished run and column
    missing: list[str] = []
    machines: list[tuple[str, dict[str, Any] | None]] = []  # (part, machine record) per finished run
    wall = 0.0
    for part in study.parts:
        for run in grids[part.name]:
            if not run.run_dir.is_finished():
                missing.append(str(run.path))
                continue
            results = run.run_dir.load_results()
            wall += float(results.get("wall_time") or 0.0)
            machines.append((part.name, results.get("machine")))
            for split in (*part.splits, *([study.learned] if study.learned else [])):
                rows.append(
                    {
                        "row": study.row_name(run.config.encoding_label),
                        "encoding": run.config.encoding_label,
                        "column": f"{part.name}/{split}",
                        "seed": run.config.train.seed,
                        "value": _value(results, split, study.metric),
                        "wall_time": results.get("wall_time"),
                        "run_dir": str(run.path),
                    }
                )
    planned = sum(len(grid) for grid in grids.values())
    what = f"Reproduces the {study.source} at CPU scale" if study.reproduces else f"poslab's {study.source}"
    lines = [f"# {study.title}", "", f"{what}. Made by", ""]
    lines += ["```", command, "```", ""]
    lines += _setting_lines(study, grids)
    seeds = sorted({run.config.train.seed for grid in grids.values() for run in grid})
    lines += [
        f"- Seeds: {', '.join(map(str, seeds))}; {planned - len(missing)} of {planned} runs finished.",
        f"- Compute: {wall / 3600:.2f} h, the sum of the finished runs' training wall times "
        "(each run one process; grids run two at a time on 2 cores).",
        "",
    ]
    lines += _provenance_section(machines, [part.name for part in study.parts])
    if missing:
        lines += [f"**Incomplete**: {len(missing)} runs not finished; rerun the command to finish them.", ""]
    if study.best:
        comparison = _by_part(study, rows, grids)
    else:
        comparison = _comparison(study, rows) + _pair_lines(study, rows)
    lines += comparison + [""] + _bar_lines(bars) + _plot_lines(study, plots or {}) + _map_lines(maps or {})
    lines += _per_seed(study, rows, seeds) + [""]
    lines += ["## Reading", "", notes or "_Not written yet._", ""]
    return "\n".join(lines), rows


def _setting_lines(study: Study, grids: dict[str, list[GridRun]]) -> list[str]:
    lines = []
    for part in study.parts:
        config = grids[part.name][0].config
        m, t, tc = config.model, config.task, config.train
        options = ", ".join(f"{k}={v}" for k, v in t.options.items())
        with_overrides = f" with {' '.join(part.overrides)}" if part.overrides else ""
        paper = f"`{part.paper_preset}`" if part.paper_preset else "none"
        lines.append(
            f"- `{part.name}`: preset `{part.preset}`{with_overrides} (paper scale: {paper}): "
            f"{t.name}({options}) {_lengths(config)}; {m.n_layers} layers, d {m.d_model}, "
            f"{m.n_heads} heads, {m.norm}-LN; {tc.steps} steps of batch {tc.batch_size}, "
            f"lr {tc.lr:g}, warm-up {tc.warmup}."
        )
    # Many parts that differ only in their name (one task each): one line with a stand-in.
    shared = {line.replace(part.name, "<part>") for part, line in zip(study.parts, lines, strict=True)}
    if len(study.parts) > 2 and len(shared) == 1:
        names = ", ".join(f"`{part.name}`" for part in study.parts)
        lines = [shared.pop().replace("- `<part>`:", f"- Each part `<part>` of {names}:", 1)]
    lines.append(f"- The paper's setting: {study.paper_setting}.")
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


def _provenance_section(machines: list[tuple[str, dict[str, Any] | None]], parts: list[str]) -> list[str]:
    """Where and with what code the runs were made: every distinct machine record of the runs."""
    return [
        "## Provenance",
        "",
        "From each run's results.json: the commit of the code that trained it, the CPU, the instruction "
        "set its C++ kernels used, torch's thread count and version ('not recorded': the run predates "
        "the field).",
        "",
        *provenance_lines(machines, parts),
        "",
    ]


def paper_value(study: Study, value: float) -> str:
    """A number of the paper as a page shows it: marked when it is not verified."""
    check = study.numbers_check
    return f"{value:g}" + ("" if check is not None and check.verified else UNVERIFIED)


def numbers_note(study: Study) -> str:
    """One line on the paper's numbers: the source they were verified in, or the mark and what was
    tried."""
    check = study.numbers_check
    if check is None:
        return f"The paper's numbers (marked {UNVERIFIED}): not checked against the paper."
    if check.verified:
        return f"The paper's numbers: verified, {check.note}."
    return f"The paper's numbers (marked {UNVERIFIED}): unverified, {check.note}."


def _comparison(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    if not study.numbers:
        return _intervals(study, rows)
    unit = UNITS.get(study.metric, study.metric)
    better = "higher" if study.metric == "accuracy" else "lower"
    ratio_head = " | ratio ours | ratio paper" if study.ratio is not None else ""
    lines = [
        "## Ours beside the paper's",
        "",
        f"{unit}, {better} is better; ours: mean ± sample std over the seeds (n), the paper's: one number.",
        "",
        "| encoding | " + " | ".join(f"{c} ours | {c} paper" for c in study.columns) + ratio_head + " |",
        "|---|" + "---|---|" * (len(study.columns) + (study.ratio is not None)),
    ]
    for row, _ in study.rows:
        cells = []
        for column in study.columns:
            values = _values(rows, row, column)
            stats = mean_std(values)
            ours = f"{stats_cell(stats)} ({stats['n']})" if stats["n"] else "–"
            paper = study.numbers.get(row, {}).get(column)
            cells += [ours, "–" if paper is None else paper_value(study, paper)]
        if study.ratio is not None:
            cells += _ratio_cells(study, row, rows)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if study.ratio is not None:
        lines += [
            "",
            f"ratio: {study.ratio[0]} / {study.ratio[1]}, below 1 where the {unit} is lower at "
            f"{study.ratio[0]}; ours: each seed's ratio, then their mean, its 95% interval (Student's "
            "t) and n: an interval that holds 1 is no change with the length at this number of seeds.",
        ]
    return [*lines, "", numbers_note(study)]


def _by_seed(rows: list[dict[str, Any]], row: str, column: str) -> dict[int, float | None]:
    """seed -> the value of one row and column of the page."""
    return {r["seed"]: r["value"] for r in rows if r["row"] == row and r["column"] == column}


def _ratios(study: Study, rows: list[dict[str, Any]], row: str) -> dict[int, float]:
    """seed -> the row's ratio of the study's two ratio columns, for the seeds that have both."""
    top, bottom = (_by_seed(rows, row, column) for column in study.ratio)
    return {s: v / bottom[s] for s, v in top.items() if finite(v) and finite(bottom.get(s)) and bottom[s]}


DIFFERENCES = (
    "paired by seed: the mean difference, its 95% interval (Student's t) and the seeds on which the "
    "first row is better; an interval that holds 0 is no difference at this number of seeds"
)


def _span(study: Study) -> float | None:
    """The most two values of the study's metric can differ (the width of `RANGES`), or None."""
    bounds = RANGES.get(study.metric)
    return None if bounds is None else bounds[1] - bounds[0]


def _cut_note(diffs: list[dict[str, Any]], span: float | None) -> str:
    """The caption's words for differences whose interval `difference_cell` cut, if any was."""
    if not any(runs_past(diff, span) for diff in diffs):
        return ""
    return f" (cut to -{span:g}..+{span:g}, the most two values of the metric can differ, where t runs past)"


def _pair_lines(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The comparisons the reading makes (``study.pairs``): A minus B per column, paired by seed,
    and per seed's ratio where the table has one."""
    if not study.pairs:
        return []
    unit = UNITS.get(study.metric, study.metric)
    lower = study.metric != "accuracy"
    heads = [*study.columns, *(["ratio"] if study.ratio is not None else [])]
    ratio_note = " (in the ratio column, A's ratio minus B's)" if study.ratio is not None else ""
    span, diffs, table = _span(study), [], []
    for a, b in study.pairs:
        row = [
            paired_difference(_by_seed(rows, a, c), _by_seed(rows, b, c), lower_is_better=lower)
            for c in study.columns
        ]
        diffs += row
        cells = [difference_cell(diff, span=span) for diff in row]
        if study.ratio is not None:
            diff = paired_difference(_ratios(study, rows, a), _ratios(study, rows, b), lower_is_better=lower)
            cells.append(difference_cell(diff, 3))
        table.append(f"| {a} minus {b} | " + " | ".join(cells) + " |")
    return [
        "",
        "### Paired differences",
        "",
        f"Row A minus row B in {unit}{ratio_note}, {DIFFERENCES}{_cut_note(diffs, span)}.",
        "",
        "| A minus B | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
        *table,
    ]


def _intervals(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """A table without paper numbers: each cell the mean over seeds with its 95% interval (n); then,
    with a ``reference`` row, every row's paired difference from it."""
    unit = UNITS.get(study.metric, study.metric)
    higher = study.metric == "accuracy"
    head = ["| encoding | " + " | ".join(study.columns) + " |", "|---|" + "---|" * len(study.columns)]
    bounds = RANGES.get(study.metric)
    cut = f", cut to {bounds[0]:g}-{bounds[1]:g}, the metric's range" if bounds else ""
    lines = [
        "## Results",
        "",
        f"{unit}, {'higher' if higher else 'lower'} is better; each cell: the mean over the seeds, its "
        f"95% interval (Student's t{cut}; none for one seed) and the number of seeds.",
        "",
        *head,
    ]
    for row, _ in study.rows:
        cells = []
        for column in study.columns:
            stats = interval(_values(rows, row, column))
            if not stats["n"]:
                cells.append("–")
            elif stats["n"] == 1:
                cells.append(f"{stats['mean']:.1f} (1)")
            else:
                low, high = stats["low"], stats["high"]
                if bounds:
                    low, high = max(low, bounds[0]), min(high, bounds[1])
                cells.append(f"{stats['mean']:.1f} [{low:.1f}, {high:.1f}] ({stats['n']})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if study.reference is None:
        return lines
    span, diffs, table = _span(study), [], []
    for row, _ in study.rows:
        if row == study.reference:
            continue
        cells = []
        for column in study.columns:
            ours, theirs = (
                {r["seed"]: r["value"] for r in rows if r["row"] == name and r["column"] == column}
                for name in (row, study.reference)
            )
            diffs.append(paired_difference(ours, theirs, lower_is_better=not higher))
            cells.append(difference_cell(diffs[-1], 1, span=span))
        table.append(f"| {row} | " + " | ".join(cells) + " |")
    return [
        *lines,
        "",
        f"### Against {study.reference}",
        "",
        f"Each row minus {study.reference}, paired by seed: the mean difference in {unit}, its 95% "
        f"interval{_cut_note(diffs, span)}, and the seeds on which the row is better than "
        f"{study.reference} (an interval that holds 0 is no difference at this number of seeds).",
        "",
        *head,
        *table,
    ]


def _values(rows: list[dict[str, Any]], row: str, column: str) -> list[float | None]:
    """The values of one row and column of the page, one per finished run (seed)."""
    return [r["value"] for r in rows if r["row"] == row and r["column"] == column]


def _task_table_head(study: Study) -> list[str]:
    """The head of a table of one line per task, one column per row of ``study``."""
    return [
        "| level | task | chance (floor) | " + " | ".join(row for row, _ in study.rows) + " |",
        "|---|---|---|" + "---|" * len(study.rows),
    ]


class _ConstantAnswer(nn.Module):
    """Logits (B, T, n_outputs) that answer output ``symbol`` at every position."""

    def __init__(self, n_outputs: int, symbol: int) -> None:
        super().__init__()
        self.n_outputs, self.symbol = n_outputs, symbol

    def forward(self, inputs: Tensor) -> Tensor:
        logits = torch.zeros(*inputs.shape, self.n_outputs)
        logits[..., self.symbol] = 1.0
        return logits


class _InputMajority(nn.Module):
    """Logits (B, T, n_outputs) that answer, at every position of a sequence, the output symbol of
    its most frequent input symbol among those that are also output symbols (ties: the lower id)."""

    def __init__(self, to_output: Tensor, n_outputs: int) -> None:
        super().__init__()
        self.to_output, self.n_outputs = to_output, n_outputs  # (vocab,): output id, or -1

    def forward(self, inputs: Tensor) -> Tensor:
        ids = self.to_output[inputs]  # (B, T)
        counts = torch.zeros(inputs.shape[0], self.n_outputs)
        counts.scatter_add_(1, ids.clamp(min=0), (ids >= 0).float())
        answer = counts.argmax(dim=-1)  # (B,)
        logits = F.one_hot(answer, self.n_outputs).float()  # (B, n_outputs)
        return logits[:, None, :].expand(*inputs.shape, self.n_outputs)


def position_blind_floor(config, split: str) -> float:
    """The best score of two answers that need no position signal, on the very sequences a run of
    ``config`` is scored on at ``split`` (`poslab.lab.evaluate.evaluate`): one output symbol
    everywhere (the test's most frequent one), or each sequence's most frequent input symbol at all
    its output positions. A bidirectional encoder without positions gives every placeholder the same
    output and can do the second: on reverse string it scores 54.9, not the 50 of chance."""
    task = config.task.build()
    eval_config = dataclasses.replace(config.eval, splits=(split,))
    metric = task.headline if task.headline == "accuracy" else "error"
    outputs = {name: i for i, name in enumerate(task.output_tokens)}
    to_output = torch.tensor([outputs.get(name, -1) for name in task.tokens])
    answers = [_ConstantAnswer(task.n_outputs, i) for i in range(task.n_outputs)]
    answers.append(_InputMajority(to_output, task.n_outputs))
    scores = []
    for answer in answers:
        result = evaluate(answer, task, eval_config, train_len=config.task.train_len, device="cpu")
        scores.append(result["splits"][split][metric])
    return max(scores) if metric == "accuracy" else min(scores)


def _task_info(study: Study, grids: dict[str, list[GridRun]], splits: list[str]) -> dict[str, dict[str, str]]:
    """Per part: its task's level, its name as the page shows it (marked † when the task is
    permutation-invariant) and, per split, the chance cell: chance, and in brackets the
    position-blind floor (`position_blind_floor`) where it is more than half a point above."""
    info = {}
    for part in study.parts:
        config = grids[part.name][0].config
        task = config.task.build()
        chance = getattr(task, "chance", None)
        cells = {}
        for split in splits:
            if chance is None:
                cells[split] = "–"
                continue
            floor = position_blind_floor(config, split) if study.metric == "accuracy" else None
            above = floor is not None and floor > chance + 0.5
            cells[split] = f"{chance:.0f}" + (f" ({floor:.1f})" if above else "")
        mark = " †" if getattr(task, "permutation_invariant", False) else ""
        info[part.name] = {
            "level": str(getattr(task, "level", "–")).replace("_", "-"),
            "name": f"{part.name}{mark}",
            **cells,
        }
    return info


def _by_part(study: Study, rows: list[dict[str, Any]], grids: dict[str, list[GridRun]]) -> list[str]:
    """One line per column (its task's level and chance where the task has them), one column per
    row of the table; each cell the best seed, then mean ± sample std (n), then the paper's value.
    Then, at the training lengths (``study.learned``), the mean; and the rows against the
    ``reference`` row and the ``pairs``, paired by seed, at both splits."""
    unit = UNITS.get(study.metric, study.metric)
    higher = study.metric == "accuracy"
    splits = sorted({split for part in study.parts for split in part.splits})
    info = _task_info(study, grids, [*splits, *([study.learned] if study.learned else [])])
    lines = [
        "## Ours beside the paper's",
        "",
        f"{unit}, {'higher' if higher else 'lower'} is better. Each cell: the best seed, then the mean ± "
        "sample std over the seeds (n), then the paper's number where there is one; the "
        "Chomsky-hierarchy papers report the best run. Chance: guessing uniformly among the task's "
        "output symbols; in brackets, where it is higher, the floor of a model blind to positions: the "
        "better of answering the test's most frequent output symbol everywhere and answering each "
        "sequence's most frequent input symbol at all its output positions, computed on the same test "
        "sequences. † the answer does not depend on the order of the input (permutation-invariant; "
        "the DAPE paper marks these tasks so).",
        "",
        *_task_table_head(study),
    ]
    for part in study.parts:
        task = info[part.name]
        for split in part.splits:
            column = f"{part.name}/{split}"
            cells = []
            for row, _ in study.rows:
                values = _values(rows, row, column)
                stats = mean_std(values)
                known = [v for v in values if v is not None]
                cell = "–"
                if known:
                    best = max(known) if higher else min(known)
                    cell = f"**{best:.2f}** / {stats_cell(stats)} ({stats['n']})"
                paper = study.numbers.get(row, {}).get(column)
                cells.append(cell if paper is None else f"{cell} / paper {paper_value(study, paper)}")
            name = task["name"] if len(part.splits) == 1 else f"{task['name']} {split}"
            lines.append(f"| {task['level']} | {name} | {task[split]} | " + " | ".join(cells) + " |")
    if study.numbers:
        lines += ["", numbers_note(study)]
    if study.learned is not None:
        lines += [
            "",
            f"### At the training lengths ({study.learned})",
            "",
            f"The same runs scored on split {study.learned}: {unit}, mean ± sample std over the seeds (n). "
            "Near chance or the floor here, a model did not learn the task, and its score above says "
            "nothing about extrapolation.",
            "",
            *_task_table_head(study),
        ]
        for part in study.parts:
            task = info[part.name]
            column = f"{part.name}/{study.learned}"
            cells = []
            for row, _ in study.rows:
                stats = mean_std(_values(rows, row, column))
                cells.append(f"{stats_cell(stats)} ({stats['n']})" if stats["n"] else "–")
            line = f"| {task['level']} | {task['name']} | {task[study.learned]} | "
            lines.append(line + " | ".join(cells) + " |")
    for split in [*splits, *([study.learned] if study.learned else [])]:
        lines += _task_differences(study, rows, info, split)
    return lines


def _task_differences(
    study: Study, rows: list[dict[str, Any]], info: dict[str, dict[str, str]], split: str
) -> list[str]:
    """At ``split`` of every part, one line per task: the reference row minus each other row (is the
    reference best?) and each pair's A minus B, paired by seed."""
    columns = [(f"{study.reference} minus {row}", study.reference, row) for row, _ in study.rows]
    columns = [c for c in columns if c[1] != c[2]] if study.reference is not None else []
    columns += [(f"{a} minus {b}", a, b) for a, b in study.pairs]
    if not columns:
        return []
    unit = UNITS.get(study.metric, study.metric)
    lower = study.metric != "accuracy"
    span, diffs, table = _span(study), [], []
    for part in study.parts:
        column = f"{part.name}/{split}"
        row = [
            paired_difference(_by_seed(rows, a, column), _by_seed(rows, b, column), lower_is_better=lower)
            for _, a, b in columns
        ]
        diffs += row
        cells = [difference_cell(diff, 1, span=span) for diff in row]
        table.append(f"| {info[part.name]['name']} | " + " | ".join(cells) + " |")
    return [
        "",
        f"### Paired differences at split {split}",
        "",
        f"{unit}, {DIFFERENCES}{_cut_note(diffs, span)}.",
        "",
        "| task | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
        *table,
    ]


def _plot_lines(study: Study, plots: dict[str, str]) -> list[str]:
    if not study.plot:
        return []
    splits = " and ".join(study.plot)
    lines = [
        "## Per length",
        "",
        f"{study.metric} at each evaluated length of {splits}, one line per encoding (the mean over the "
        "seeds); grey dotted: chance, dashed: the longest training length.",
        "",
    ]
    if not plots:
        return lines + ["_No plots: no finished runs, or matplotlib is not installed._", ""]
    return lines + [f"![{part}]({path})" for part, path in plots.items()] + [""]


def _ratio_cells(study: Study, row: str, rows: list[dict[str, Any]]) -> list[str]:
    """Ours (each seed's ratio of the two columns: their mean, 95% interval and n) and the paper's."""
    top, bottom = study.ratio
    ratios = _ratios(study, rows, row)
    ours = f"{_interval_cell(ratios)} ({len(ratios)})" if ratios else "–"
    paper = study.numbers.get(row, {})
    both = top in paper and bottom in paper
    mark = "" if study.numbers_check is not None and study.numbers_check.verified else UNVERIFIED
    return [ours, f"{paper[top] / paper[bottom]:.3f}{mark}" if both else "–"]


def _per_seed(study: Study, rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """Every seed's value of every row and column (and of the ``learned`` split, after them)."""
    learned = [f"{part.name}/{study.learned}" for part in study.parts] if study.learned else []
    lines = [
        "## Every seed",
        "",
        "| encoding | column | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for row, _ in study.rows:
        for column in [*study.columns, *learned]:
            by_seed = {r["seed"]: r["value"] for r in rows if r["row"] == row and r["column"] == column}
            cells = ["–" if by_seed.get(s) is None else f"{by_seed[s]:.2f}" for s in seeds]
            lines.append(f"| {row} | {column} | " + " | ".join(cells) + " |")
    return lines


def table_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    head = ["row", "encoding", "column", "seed", "value", "wall_time", "run_dir"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    for r in rows:
        writer.writerow([csv_value(r[k]) if k in ("value", "wall_time") else r[k] for k in head])
    return out.getvalue()


# -- a task table's plots --------------------------------------------------------------------------


def _bar_lines(path: str | None) -> list[str]:
    if path is None:
        return []
    return [
        "## Every column",
        "",
        "One group per column, one colour per row: the bar (for perplexity, a line) is the mean over the "
        "seeds and the dots are the seeds; the diamonds are the paper's numbers (for perplexity in a "
        "panel of their own: the paper's corpus and model differ, compare the pattern). A table with a "
        "ratio has a last panel of each seed's ratio, the paper's beside it.",
        "",
        f"![every column]({path})",
        "",
    ]


def draw_bars(study: Study, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The figure of every column of a task table (``study.bars``): per part a panel of ours, one
    group per split and one bar per row at its mean with every seed as a dot and the paper's number
    as a diamond; for perplexity (large values close together) a line at the mean instead of a bar
    from 0, and the paper's numbers in a panel of their own; with a ``ratio``, a panel of each seed's
    ratio beside the paper's. None without matplotlib."""
    if not plotting.can_plot("the column figure"):
        return None
    names = [row for row, _ in study.rows]
    ppl = study.metric == "ppl"
    check = study.numbers_check
    paper_label = "paper" if check is not None and check.verified else "paper (unverified)"
    panels: list[tuple[str, Part | None]] = []
    for part in study.parts:
        panels.append(("ours", part))
        has_paper = any(
            f"{part.name}/{split}" in study.numbers.get(row, {}) for row in names for split in part.splits
        )
        if ppl and has_paper:
            panels.append(("paper", part))
    if study.ratio is not None:
        panels.append(("ratio", None))
    width = 0.8 / len(names)
    size = max(3.5, 2.8 * len(study.columns)) + 1.8 * (len(panels) - 1) + 2.2  # the last: the legend
    fig = plotting.figure(figsize=(size, 4.4))
    *axes, key = fig.subplots(1, len(panels) + 1, squeeze=False, width_ratios=[3] * len(panels) + [2])[0]

    def offset(group: int, i: int) -> float:
        return group + (i - (len(names) - 1) / 2) * width

    def seeds_and_mean(ax, kind: str, x: float, values: list[float], i: int, label: str | None) -> None:
        colour = plotting.line_style(i)["color"]
        if not values:  # no finished run: in the legend only
            ax.plot([], [], color=colour, linewidth=2.5, label=label)
            return
        mean = sum(values) / len(values)
        if ppl or kind == "ratio":
            ax.hlines(mean, x - width / 2, x + width / 2, color=colour, linewidth=2.5, label=label)
        else:
            ax.bar(x, mean, width * 0.9, color=colour, alpha=0.55, label=label)
        ax.plot([x] * len(values), values, "o", color=colour, markersize=3.5, markeredgecolor="black",
                markeredgewidth=0.4)  # fmt: skip

    labelled: set[str] = set()
    for ax, (kind, part) in zip(axes, panels, strict=True):
        if kind == "ratio":
            for i, row in enumerate(names):
                ratios = list(_ratios(study, rows, row).values())
                seeds_and_mean(ax, kind, offset(0, i), ratios, i, None)
                paper = study.numbers.get(row, {})
                if all(column in paper for column in study.ratio):
                    colour = plotting.line_style(i)["color"]
                    ratio = paper[study.ratio[0]] / paper[study.ratio[1]]
                    ax.plot(offset(0, i), ratio, "D", color=colour, markeredgecolor="black", markersize=5)
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xticks(
                [0], [f"{study.ratio[0].split('/')[-1]} / {study.ratio[1].split('/')[-1]}"], fontsize=8
            )
            ax.set_title("ratio, each seed (paper: diamond)", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            continue
        for g, split in enumerate(part.splits):
            column = f"{part.name}/{split}"
            for i, row in enumerate(names):
                paper = study.numbers.get(row, {}).get(column)
                if kind == "ours":
                    label = row if row not in labelled else None
                    labelled.add(row)
                    values = [v for v in _values(rows, row, column) if finite(v)]
                    seeds_and_mean(ax, kind, offset(g, i), values, i, label)
                if paper is not None and (kind == "paper" or not ppl):
                    label = paper_label if paper_label not in labelled else None
                    labelled.add(paper_label)
                    colour = plotting.line_style(i)["color"] if ppl else "black"
                    ax.plot(
                        offset(g, i),
                        paper,
                        "D",
                        color=colour,
                        markeredgecolor="black",
                        markersize=5,
                        label=label,
                    )
        ax.set_xticks(range(len(part.splits)), list(part.splits), fontsize=8)
        ax.set_title(part.name if kind == "ours" else f"{part.name}: the paper's", fontsize=9)
        ax.set_ylabel(UNITS.get(study.metric, study.metric))
        ax.grid(True, axis="y", alpha=0.3)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [label for ax in axes for label in ax.get_legend_handles_labels()[1]]
    key.axis("off")
    key.legend(handles, [textwrap.fill(label, 22) for label in labels], fontsize=7, loc="center left")
    return plotting.save(fig, path, dpi=100)


def length_curves(study: Study, grid: list[GridRun]) -> tuple[dict[str, dict[int, float]], int | None]:
    """Per row of ``study``, the mean over finished seeds of the metric at every length of the
    table's plot splits (lengths where every seed is missing are left out); and the last length of
    the first split (for the id split: the longest training length)."""
    per_row: dict[str, dict[int, list[float]]] = {}
    boundary = None
    for run in grid:
        if not run.run_dir.is_finished():
            continue
        lengths = run.run_dir.load_results()["metrics"].get("lengths", {})
        curve = per_row.setdefault(study.row_name(run.config.encoding_label), {})
        for index, split in enumerate(study.plot):
            scored = {int(n): m.get(study.metric) for n, m in lengths.get(split, {}).items()}
            if index == 0 and scored:
                boundary = max(scored)
            for n, value in scored.items():
                if finite(value):
                    curve.setdefault(n, []).append(value)
    means = {
        row: {n: sum(vs) / len(vs) for n, vs in sorted(per_row[row].items())}
        for row, _ in study.rows
        if per_row.get(row)
    }
    return means, boundary


def draw_length_plots(study: Study, grids: dict[str, list[GridRun]], folder: Path) -> dict[str, str]:
    """Each part's figure of `length_curves` in ``folder/<part>.png``; {part: "plots/<part>.png"},
    empty (and a warning) without matplotlib. Parts without finished runs get none."""
    if not plotting.can_plot("the per-length plots"):
        return {}
    written = {}
    for part in study.parts:
        curves, boundary = length_curves(study, grids[part.name])
        if not curves:
            continue
        task = grids[part.name][0].config.task.build()
        fig = plotting.figure(figsize=(7, 4.2))
        ax = fig.subplots()
        for index, (row, curve) in enumerate(curves.items()):
            ax.plot(
                list(curve), list(curve.values()), marker="o", markersize=3, label=row,
                **plotting.line_style(index),
            )  # fmt: skip
        if getattr(task, "chance", None) is not None:
            ax.axhline(task.chance, color="grey", linestyle=":", linewidth=1)
        if boundary is not None and len(study.plot) > 1:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("input length")
        ax.set_ylabel(UNITS.get(study.metric, study.metric))
        ax.set_title(f"{part.name} ({str(getattr(task, 'level', '')).replace('_', '-')})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        plotting.save(fig, folder / f"{part.name}.png", dpi=100)
        written[part.name] = f"{folder.name}/{part.name}.png"
    return written


def depth_maps(
    study: Study, grid: list[GridRun]
) -> dict[str, tuple[list[int], list[int], list[list[float]]]]:
    """Per row, the depth x length grid of the metric (mean over finished seeds) of a task with
    ``depth_<percent>`` splits (the pass key): (depths in percent, lengths, values[depth][length],
    NaN where no seed has it). Empty for a task without depth splits."""
    cells: dict[str, dict[tuple[int, int], list[float]]] = {}
    for run in grid:
        if not run.run_dir.is_finished():
            continue
        lengths = run.run_dir.load_results()["metrics"].get("lengths", {})
        for split, per_length in lengths.items():
            if not split.startswith("depth_"):
                continue
            depth = int(split.removeprefix("depth_"))
            row = cells.setdefault(study.row_name(run.config.encoding_label), {})
            for n, metrics in per_length.items():
                if finite(metrics.get(study.metric)):
                    row.setdefault((depth, int(n)), []).append(metrics[study.metric])
    maps = {}
    for row, _ in study.rows:
        if not cells.get(row):
            continue
        depths = sorted({d for d, _ in cells[row]})
        lengths = sorted({n for _, n in cells[row]})
        values = [
            [sum(v) / len(v) if (v := cells[row].get((d, n))) else float("nan") for n in lengths]
            for d in depths
        ]
        maps[row] = (depths, lengths, values)
    return maps


def draw_depth_maps(study: Study, grids: dict[str, list[GridRun]], folder: Path) -> dict[str, str]:
    """Each depth-split part's heat maps (one panel per row: depth down, length across) in
    ``folder/<part>_depth.png``; {part: path relative to the page}. None without matplotlib."""
    found = {part.name: depth_maps(study, grids[part.name]) for part in study.parts}
    found = {name: maps for name, maps in found.items() if maps}
    if not found or not plotting.can_plot("the depth x length heat maps"):
        return {}
    written = {}
    for name, maps in found.items():
        cols = min(5, len(maps))
        rows = -(-len(maps) // cols)
        fig = plotting.figure(figsize=(2.6 * cols, 2.3 * rows + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        panels = zip(axes.flat, maps.items(), strict=False)  # more panels than rows: blanked below
        for ax, (row, (depths, lengths, values)) in panels:
            ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            for i, line in enumerate(values):  # the value in each cell, dark text on light cells
                for j, value in enumerate(line):
                    if finite(value):
                        colour = "black" if value > 60 else "white"
                        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6, color=colour)
            ax.set_title(row, fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6, rotation=45)
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=6)
        for ax in list(axes.flat)[len(maps) :]:
            ax.axis("off")
        unit = UNITS.get(study.metric, study.metric)
        fig.suptitle(f"{name}: {unit} by the key's depth (down) and the length (across); 0 dark, 100 yellow")
        plotting.save(fig, folder / f"{name}_depth.png", dpi=100)
        written[name] = f"{folder.name}/{name}_depth.png"
    return written


def _map_lines(maps: dict[str, str]) -> list[str]:
    if not maps:
        return []
    lines = ["## By depth and length", "", "The mean over the seeds in each (depth, length) cell.", ""]
    return lines + [f"![{part} by depth]({path})" for part, path in maps.items()] + [""]


# -- an LM extrapolation study ---------------------------------------------------------------------


def _part_lengths(result: dict[str, Any]) -> list[int]:
    return list(result["settings"]["lengths"])


def _seed_values(result: dict[str, Any], spec: str, length: int) -> dict[int, float]:
    """seed -> last-256 perplexity of ``spec``'s runs at ``length`` (the scored ones)."""
    values = {}
    for run in result["runs"]:
        cell = run["results"].get(str(length), {})
        if run["encoding"] == spec and cell.get("status") == "ok":
            values[run["seed"]] = cell["ppl_last"]
    return values


def _hours(seconds: float) -> str:
    """``1.46 h``; under a tenth of an hour in minutes or seconds, which 0.00 h would hide."""
    if seconds >= 360:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _seed_ratios(result: dict[str, Any], spec: str, top: int, first: int) -> dict[int, float]:
    """seed -> ``spec``'s perplexity at ``top`` over its perplexity at ``first``, over the seeds
    scored at both."""
    high, low = _seed_values(result, spec, top), _seed_values(result, spec, first)
    return {s: high[s] / low[s] for s in sorted(set(high) & set(low)) if finite(high[s]) and finite(low[s])}


def _interval_cell(values: dict[int, float]) -> str:
    """``1.026 [1.004, 1.048]``: the mean of the values and its 95% interval (none for one value)."""
    if not values:
        return "–"
    stats = interval(list(values.values()))
    text = f"{stats['mean']:.3f}"
    return text + (f" [{stats['low']:.3f}, {stats['high']:.3f}]" if stats["n"] > 1 else "")


def _cell(result: dict[str, Any], spec: str, length: int) -> str:
    values = _seed_values(result, spec, length)
    return stats_cell(mean_std(list(values.values()))) if values else "n/a"


def _about(result: dict[str, Any], run_dirs: dict[tuple[str, int], RunDir] | None = None) -> dict[str, Any]:
    """Parameters, steps, learning rates, machine records and wall times of a part's runs
    (``run_dirs``: each run by (encoding, seed); default: the folder the result names)."""
    machines: list[dict[str, Any] | None] = []
    steps, params, lrs, train_s = set(), set(), set(), 0.0
    for run in result["runs"]:
        run_dir = RunDir(run["run_dir"]) if run_dirs is None else run_dirs[run["encoding"], run["seed"]]
        try:
            machine = run_dir.load_results().get("machine")
        except ValueError:
            machine = None
        with contextlib.suppress(ValueError):  # a run without its config shows '?'
            lrs.add(run_dir.load_config().train.lr)
        machines.append(machine)
        steps.add(run["step"])
        params.add(run["n_params"])
        train_s += run["train_wall_time"] or 0.0
    eval_s = sum(run["eval_seconds"] for run in result["runs"])
    return {
        "machines": machines,
        "steps": steps,
        "params": params,
        "lrs": lrs,
        "train_s": train_s,
        "eval_s": eval_s,
    }


def _part_section(
    study: Study, part: Part, result: dict[str, Any], run_dirs: dict[tuple[str, int], RunDir] | None
) -> list[str]:
    lengths = _part_lengths(result)
    about = _about(result, run_dirs)
    top = lengths[-1]
    settings = result["settings"]
    lines = [
        f"## {part.name}",
        "",
        " ".join([f"`{part.preset}`", *(f"`{o}`" for o in part.overrides)])
        + f": {settings['corpus']}, {settings['tokenizer']} tokens, "
        f"{'/'.join(map(str, sorted(about['params'])))} parameters, "
        f"{'/'.join(map(str, sorted(about['steps'])))} steps. Training {_hours(about['train_s'])} "
        f"(summed over runs), scoring {_hours(about['eval_s'])}.",
        "",
        f"Perplexity on the last {settings['last']} tokens of each window, mean ± sample std over seeds "
        f"(windows per length: {', '.join(f'{n}: {w}' for n, w in settings['windows'].items())}):",
        "",
        "| row | encoding | " + " | ".join(map(str, lengths)) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for row, spec in study.rows:
        cells = [_cell(result, spec, n) for n in lengths]
        lines.append(f"| {row} | `{spec}` | " + " | ".join(cells) + " |")
    seeds = sorted({run["seed"] for run in result["runs"]})
    lines += [
        "",
        f"Every seed at {top} ({top / lengths[0]:g}x):",
        "",
        "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for row, spec in study.rows:
        values = _seed_values(result, spec, top)
        cells = [f"{values[s]:.2f}" if s in values and finite(values[s]) else "–" for s in seeds]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    ratio = f"{top}/{lengths[0]}"
    if study.aligned:
        # On aligned windows the longer window scores the same tokens with more context before them,
        # so each seed's ratio is what that context does to the model, with the text held fixed.
        lines += [
            "",
            f"Each seed's perplexity at {top} over its own at {lengths[0]}: the same scored tokens with "
            f"{top / lengths[0]:g} times the context (below 1, the added context helps); the mean and its "
            "95% interval (Student's t):",
            "",
            "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
            "|---|" + "---|" * (len(seeds) + 1),
        ]
        for row, spec in study.rows:
            ratios = _seed_ratios(result, spec, top, lengths[0])
            cells = [f"{ratios[s]:.3f}" if s in ratios else "–" for s in seeds]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {_interval_cell(ratios)} |")
    if study.pairs:
        columns = [*map(str, lengths), *([f"ratio {ratio}"] if study.aligned else [])]
        lines += [
            "",
            f"Row A minus row B at every length, last-{result['settings']['last']} perplexity"
            + (f" (and the difference of the ratios {ratio})" if study.aligned else "")
            + f", {DIFFERENCES}:",
            "",
            "| A minus B | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for a, b in study.pairs:
            cells = [
                difference_cell(paired_difference(_seed_values(result, study.spec(a), n),
                                                  _seed_values(result, study.spec(b), n)))
                for n in lengths
            ]  # fmt: skip
            if study.aligned:
                ratios_a = _seed_ratios(result, study.spec(a), top, lengths[0])
                ratios_b = _seed_ratios(result, study.spec(b), top, lengths[0])
                cells.append(difference_cell(paired_difference(ratios_a, ratios_b), digits=3))
            lines.append(f"| {a} minus {b} | " + " | ".join(cells) + " |")
    lines += ["", f"![perplexity against length]({part.name}/ppl_last.png)", ""]
    return lines


def _paired_gaps(result: dict[str, Any], new: str, base: str, length: int) -> dict[int, float]:
    """seed -> ``new`` minus ``base`` at ``length``, over the seeds both have."""
    a, b = _seed_values(result, new, length), _seed_values(result, base, length)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _gap_cell(result: dict[str, Any], new: str, base: str, length: int) -> str:
    """``new`` minus ``base`` at ``length``, paired by seed: mean [95% interval], seeds ``new`` wins."""
    return difference_cell(
        paired_difference(_seed_values(result, new, length), _seed_values(result, base, length))
    )


def _gap_lines(study: Study, results: dict[str, dict[str, Any]], run_dirs: RunDirs | None) -> list[str]:
    """Per part: the two rows at the longest length and their difference, paired by seed, and the
    difference at the training length beside it (a gap already there is not about extrapolation)."""
    new, base = study.gap
    lines = [
        f"## The gap at the longest length: {new} minus {base}",
        "",
        f"Negative: DAPE is better. The gap is {DIFFERENCES}; then each seed's gap, and the same gap "
        "at the training length, where no extrapolation is involved.",
        "",
        f"| part | parameters ({base}) | steps | lr | length | {base} | {new} | gap | per seed "
        "| gap at the training length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part in study.parts:
        if part.name not in results:
            continue
        result = results[part.name]
        lengths = _part_lengths(result)
        top = lengths[-1]
        about = _about(result, None if run_dirs is None else run_dirs[part.name])
        gaps = _paired_gaps(result, study.spec(new), study.spec(base), top)
        params = {run["n_params"] for run in result["runs"] if run["encoding"] == study.spec(base)}
        cells = [
            part.name,
            "/".join(map(str, sorted(params))),
            "/".join(map(str, sorted(about["steps"]))),
            "/".join(f"{lr:g}" for lr in sorted(about["lrs"])) or "?",
            str(top),
            _cell(result, study.spec(base), top),
            _cell(result, study.spec(new), top),
            _gap_cell(result, study.spec(new), study.spec(base), top),
            ", ".join(f"{g:+.2f}" for g in gaps.values()) or "–",
            _gap_cell(result, study.spec(new), study.spec(base), lengths[0]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paper_lines(study: Study, results: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's numbers and ours at the same multiple of the training length."""
    parts = [part.name for part in study.parts if part.name in results]
    lines = [
        "## The paper's numbers beside ours",
        "",
        "The paper's models, corpora and training lengths differ from ours (see the setting above): "
        "ours are at the same multiple of our training length. Compare the pattern, not the values.",
        "",
        "| paper's setting | row | at | paper | " + " | ".join(f"ours ({p})" for p in parts) + " |",
        "|---|---|---|---|" + "---|" * len(parts),
    ]
    for number in study.paper_numbers:
        ratio = number.length / number.train_len
        cells = []
        for name in parts:
            result = results[name]
            length = int(result["settings"]["train_lens"][0] * ratio)
            known = length in _part_lengths(result)
            cells.append(f"{_cell(result, study.spec(number.row), length)} at {length}" if known else "–")
        mark = "" if study.numbers_check is not None and study.numbers_check.verified else UNVERIFIED
        lines.append(
            f"| {number.setting} | {number.row} | {number.length} ({ratio:g}x) | {number.value:.2f}{mark} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, "", numbers_note(study), ""]


def lm_page(
    study: Study,
    results: dict[str, dict[str, Any]],
    *,
    command: str,
    notes: str | None = None,
    run_dirs: RunDirs | None = None,
) -> str:
    """The README of a study from its parts' extrapolation results (part name -> result) and their
    runs (``run_dirs``, default: the folders the results name), ending with ``notes``, the reading
    written by hand."""
    seeds = sorted({run["seed"] for result in results.values() for run in result["runs"]})
    missing = [part.name for part in study.parts if part.name not in results]
    lines = [
        f"# {study.title}",
        "",
        f"Source: {study.source}. Setting: {study.paper_setting}.",
        "",
        "```",
        command,
        "```",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Each part's own report (table.md with all-token "
        "perplexity too, results.csv, results.json, plots) is in its folder.",
        "",
    ]
    abouts = [
        _about(result, None if run_dirs is None else run_dirs[name]) for name, result in results.items()
    ]
    lines += [
        f"Compute: training {_hours(sum(a['train_s'] for a in abouts))} and scoring "
        f"{_hours(sum(a['eval_s'] for a in abouts))}, summed over runs.",
        "",
    ]
    machines = [(name, m) for name, a in zip(results, abouts, strict=True) for m in a["machines"]]
    lines += _provenance_section(machines, list(results))
    if missing:
        lines += [f"**Incomplete**: no results yet for {', '.join(missing)}; rerun the command.", ""]
    if study.gap is not None:
        lines += _gap_lines(study, results, run_dirs)
    if study.paper_numbers:
        lines += _paper_lines(study, results)
    for part in study.parts:
        if part.name in results:
            lines += _part_section(
                study, part, results[part.name], None if run_dirs is None else run_dirs[part.name]
            )
    lines += ["## Reading", "", notes or "_Not written yet._", ""]
    return "\n".join(lines)


def lm_csv(study: Study, results: dict[str, dict[str, Any]]) -> str:
    """One row per part, run and length: the row name, seed and both perplexities."""
    names = {spec: row for row, spec in study.rows}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["part", "row", "encoding", "seed", "length", "status", "ppl_last", "ppl_all"])
    for part, result in results.items():
        for run in result["runs"]:
            for length, cell in run["results"].items():
                writer.writerow(
                    [part, names.get(run["encoding"], run["encoding"]), run["encoding"], run["seed"], length]
                    + [cell["status"], csv_value(cell.get("ppl_last")), csv_value(cell.get("ppl_all"))]
                )
    return out.getvalue()
