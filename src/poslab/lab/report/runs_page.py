"""The results page of finished runs (train, eval, compare, report): mean ± std over seeds per
encoding.

`write_report` turns run directories (each with config.json and results.json, see
`poslab.lab.rundir`, or their records in a data file, `poslab.lab.report.datafile`) into
``table.md`` (Markdown), ``results.csv`` (one row per run), ``lengths.csv`` (per-length metrics,
for tasks evaluated per length), ``results.json`` (runs and summary) and PNG plots:
``<task>_splits.png`` (the headline metric per split as grouped bars) and ``<task>_lengths.png``
(accuracy against length, one line per encoding). matplotlib is imported only to plot; without it
(``pip install poslab[plot]``) the plots are skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poslab.encodings import encoding_class, encoding_options
from poslab.lab import plotting
from poslab.lab.checkpoint import write_text
from poslab.lab.config import flatten
from poslab.lab.report.common import csv_value, finite, mean_std, stats_cell, write_page
from poslab.lab.report.datafile import recorded_below
from poslab.lab.rundir import CONFIG, RESULTS, RunDir, check_results, find_finished_runs
from poslab.lab.tasks import TASKS

log = logging.getLogger("poslab")


@dataclass(frozen=True)
class RunRecord:
    """One finished run: where it is and what its results.json says."""

    run_dir: Path
    task: str
    label: str  # the encoding spec, e.g. 'dape[base=kerple_log]'
    seed: int
    results: dict[str, Any]
    config: dict[str, Any] | None = None  # its config.json (None: compared on task and label only)

    @property
    def splits(self) -> dict[str, dict[str, float]]:
        return self.results["metrics"]["splits"]

    @property
    def lengths(self) -> dict[str, dict[str, dict[str, float]]]:
        return self.results["metrics"].get("lengths") or {}


def load_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """`RunRecord` of every finished run at or below ``paths``: run folders, and the runs the
    nearest data file at or above each path records (`poslab.lab.report.datafile`), whose folders
    may be gone; a folder that is there is read from the folder. Each path's runs in the order of
    their folders' names."""
    records = []
    for run_dir in _finished_runs(paths):
        results = run_dir.load_results()
        where = getattr(run_dir, "where", "") or run_dir / RESULTS
        check_results(results, where, required=("task", "encoding", "seed", "metrics"))
        if not results.get("metrics"):
            raise ValueError(f"{where} holds no evaluation")
        config = _config_dict(run_dir)
        records.append(
            RunRecord(run_dir.path, results["task"], results["encoding"], results["seed"], results, config)
        )
    return records


def _finished_runs(paths: Sequence[str | Path]) -> list[RunDir]:
    """The finished runs at or below ``paths``, from their folders or their data file's records."""
    found: dict[Path, RunDir] = {}
    for path in map(Path, paths):
        recorded = dict(recorded_below(path))
        folders: list[Path] = []
        if path.exists() or not recorded:
            try:
                folders = find_finished_runs([path])
            except ValueError:
                if not recorded:
                    raise
        for run in sorted({*folders, *recorded}):
            found.setdefault(run, RunDir(run) if run in folders else recorded[run])
    return list(found.values())


def _config_dict(run_dir: RunDir) -> dict[str, Any]:
    """The run's config with defaults filled in, or config.json as written when it does not parse
    (a run of another poslab version is still compared key by key)."""
    try:
        return run_dir.load_config().to_dict()
    except (TypeError, ValueError):
        pass
    record = getattr(run_dir, "record", None)
    if record is not None:
        return record["config"]
    try:
        raw = json.loads((run_dir / CONFIG).read_text())
    except ValueError:
        raise ValueError(f"{run_dir / CONFIG} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{run_dir / CONFIG} is not a run config (a JSON {type(raw).__name__})")
    return raw


# -- statistics ------------------------------------------------------------------------------------


def flat_metrics(splits: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"id": {"error": 1.0}}`` -> ``{"id/error": 1.0}``."""
    return {f"{split}/{key}": value for split, ms in splits.items() for key, value in ms.items()}


def _stats(records: list[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """`mean_std` of each key over records (a key missing from a record counts as missing)."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: mean_std([r.get(k) for r in records]) for k in keys}


# Keys that do not change what a run learns or how it is scored: runs differing only in them pool.
_NOT_COMPARED = (
    "train.seed",
    "train.device",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "model.encoding",  # the row label already
)


def _settings(run: RunRecord) -> dict[str, Any]:
    flat = flatten(run.config) if run.config is not None else {}
    return {k: v for k, v in flat.items() if k not in _NOT_COMPARED}


def group_runs(runs: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """Runs that differ in the seed alone, per (task, row label) in order of appearance.

    Runs of one encoding whose configs differ otherwise (``train.steps``, a model size) become rows
    of their own, labelled with the settings they differ in (``rope [train.steps=8]``); a seed that
    appears twice in one row raises ValueError naming both directories, since mean ± std over
    repeated runs would count one seed twice.
    """
    by_encoding: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        by_encoding.setdefault((run.task, run.label), []).append(run)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for (task, label), members in by_encoding.items():
        settings = [_settings(r) for r in members]
        keys = sorted({k for s in settings for k in s if any(t.get(k) != s.get(k) for t in settings)})
        for run, setting in zip(members, settings, strict=True):
            suffix = ", ".join(f"{k}={setting.get(k)}" for k in keys)
            groups.setdefault((task, f"{label} [{suffix}]" if keys else label), []).append(run)
    for (_, label), members in groups.items():
        seen: dict[int, RunRecord] = {}
        for run in members:
            if run.seed in seen:
                raise ValueError(
                    f"{seen[run.seed].run_dir} and {run.run_dir} are both seed {run.seed} of {label}; "
                    "a report counts each seed once, so give only one of them (runs given twice?)"
                )
            seen[run.seed] = run
    return groups


def summarize(runs: list[RunRecord]) -> dict[str, dict[str, Any]]:
    """Per task and row (`group_runs`: runs that differ in the seed alone, in order of appearance):
    seeds, n, and mean/std/n of every metric (``"id/error"``) and of every per-length metric
    (``lengths[split][length][metric]``)."""
    summary: dict[str, dict[str, Any]] = {}
    for (task, label), group in group_runs(runs).items():
        entry: dict[str, Any] = {
            "n": len(group),
            "seeds": [r.seed for r in group],
            "headline": group[0].results.get("headline") or "error",
            "chance": group[0].results.get("chance"),
            "metrics": _stats([flat_metrics(r.splits) for r in group]),
            "lengths": {},
        }
        for split in dict.fromkeys(s for r in group for s in r.lengths):
            curves = [r.lengths.get(split, {}) for r in group]  # {length: {metric: value}} per seed
            lengths = sorted({int(n) for curve in curves for n in curve})
            entry["lengths"][split] = {
                str(n): _stats([curve.get(str(n), {}) for curve in curves]) for n in lengths
            }
        summary.setdefault(task, {})[label] = entry
    return summary


# -- outputs ---------------------------------------------------------------------------------------


def table_columns(entries: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric key, column title) pairs: the headline metric of each split, then for error
    tables the sequence error of each split."""
    first = next(iter(entries.values()))
    headline = first["headline"]
    splits = list(dict.fromkeys(k.split("/")[0] for e in entries.values() for k in e["metrics"]))
    columns = [(f"{s}/{headline}", f"{s} {headline} %") for s in splits]
    if headline == "error":
        columns += [
            (f"{s}/seq_error", f"{s} seq error %")
            for s in splits
            if any(f"{s}/seq_error" in e["metrics"] for e in entries.values())
        ]
    return columns


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """One Markdown table per task: encodings as rows, mean ± std over seeds as cells."""
    blocks = []
    for task, entries in summary.items():
        first = next(iter(entries.values()))
        headline = first["headline"]
        better = "lower" if headline == "error" else "higher"
        chance = first.get("chance")
        chance_note = f", chance {100 - chance:.0f}% error" if headline == "error" and chance else ""
        if headline == "accuracy" and chance:
            shown = f"{chance:.0f}" if chance >= 1 else f"{chance:.2g}"  # 1/257 is not 0%
            chance_note = f", chance {shown}% accuracy"
        per_length = " (mean over the evaluated lengths)" if first["lengths"] else ""
        lines = [
            f"**{task}**: {headline} % per split{per_length}, mean ± sample std over n seeds; "
            f"{better} is better{chance_note}.",
            "",
        ]
        split_rows = [label for label in entries if label.endswith("]") and " [" in label]
        if split_rows:
            lines[-1:-1] = [
                "Runs of one encoding whose configs differ beyond the seed are separate rows, "
                "labelled with the settings they differ in.",
            ]
            log.warning("%s: runs differ beyond the seed; not pooled: %s", task, "; ".join(split_rows))
        columns = table_columns(entries)
        lines.append("| encoding | n | " + " | ".join(title for _, title in columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for label, entry in entries.items():
            cells = [stats_cell(entry["metrics"].get(key)) for key, _ in columns]
            lines.append(f"| {label} | {entry['n']} | " + " | ".join(cells) + " |")
        notes = _notes(task, list(entries), [title for _, title in columns])
        lines += [""] + notes if notes else []
        if len(entries) > 1:
            lines += ["", reading(entries, headline)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def reading(entries: dict[str, Any], headline: str) -> str:
    """One line that reads the table: per split, the encodings level with the best one, i.e. whose
    mean is within the larger of the two sample stds of the best mean (only exact ties with one
    seed), and the worst."""
    lower = headline == "error"
    parts = []
    for key, _ in table_columns(entries):
        split, metric = key.split("/")
        if metric != headline:
            continue
        stats = {
            label: entry["metrics"][key]
            for label, entry in entries.items()
            if key in entry["metrics"] and finite(entry["metrics"][key]["mean"])
        }
        if len(stats) < 2:
            continue
        ordered = sorted(stats, key=lambda label: stats[label]["mean"], reverse=not lower)
        best = stats[ordered[0]]

        def spread(s: dict[str, float]) -> float:
            return s["std"] if s["n"] > 1 and finite(s["std"]) else 0.0

        level = [
            label
            for label in ordered
            if abs(stats[label]["mean"] - best["mean"]) <= max(spread(best), spread(stats[label]))
        ]
        worst = ordered[-1]
        parts.append(
            f"{split}: {', '.join(level)} (worst {worst}, {stats[worst]['mean']:.2f})"
            if worst not in level
            else f"{split}: all level"
        )
    if not parts:
        return "Reading: no split has two encodings to compare."
    return (
        f"Reading, best {headline} per split (level: within one sample std of the best mean): "
        + "; ".join(parts)
        + "."
    )


def _notes(task: str, labels: list[str], titles: list[str]) -> list[str]:
    """What the columns and the less obvious rows mean: the task's splits, sequence error, and a
    DAPE row whose base is the default one (the label does not say it)."""
    notes = []
    cls = TASKS.get(task)
    split_notes = getattr(cls, "split_notes", {})
    for split in dict.fromkeys(title.split()[0] for title in titles):
        if split in split_notes:
            notes.append(f"- {split}: {split_notes[split]}")
    if any("seq error" in title for title in titles):
        notes.append("- seq error: % of sequences with at least one wrong scored token")
    base = encoding_options(encoding_class("dape")).get("base")
    for label in labels:
        if label.split(" [")[0] == "dape":
            notes.append(f"- dape: DAPE over its default base, {base} (dape[base={base}])")
    return notes


def runs_csv(runs: list[RunRecord]) -> str:
    """One row per run: identification columns, then every split metric."""
    keys = list(dict.fromkeys(k for r in runs for k in flat_metrics(r.splits)))
    head = ["task", "encoding", "seed", "run_dir", "step", "n_params", "wall_time"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head + keys)
    for r in runs:
        flat = flat_metrics(r.splits)
        ident = [r.task, r.label, r.seed, str(r.run_dir)]
        ident += [r.results.get(k) for k in ("step", "n_params", "wall_time")]
        writer.writerow(ident + [csv_value(flat.get(k)) for k in keys])
    return out.getvalue()


def lengths_csv(runs: list[RunRecord]) -> str:
    """Long format: task, encoding, seed, split, length, metric, value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "encoding", "seed", "split", "length", "metric", "value"])
    for r in runs:
        for split, per_length in r.lengths.items():
            for length, metrics in per_length.items():
                for metric, value in metrics.items():
                    writer.writerow([r.task, r.label, r.seed, split, length, metric, csv_value(value)])
    return out.getvalue()


def write_report(runs: list[RunRecord], out_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write table.md, results.csv, lengths.csv (if any), results.json and the plots to
    ``out_dir``; return ``{"table": markdown, "files": [paths written]}``."""
    if not runs:
        raise ValueError("no runs to report")
    out_dir = Path(out_dir)
    summary = summarize(runs)
    table = markdown_table(summary)
    data = {"runs": [_run_json(r) for r in runs], "summary": summary}
    files = write_page(out_dir, table=table, csv=runs_csv(runs), data=data)
    if any(r.lengths for r in runs):
        files.append(out_dir / "lengths.csv")
        write_text(files[-1], lengths_csv(runs))
    if plots:
        files += write_plots(summary, out_dir)
    return {"table": table, "files": files, "summary": summary}


def _run_json(r: RunRecord) -> dict[str, Any]:
    return {
        "task": r.task,
        "encoding": r.label,
        "seed": r.seed,
        "run_dir": str(r.run_dir),
        "metrics": flat_metrics(r.splits),
        "lengths": r.lengths,
        "wall_time": r.results.get("wall_time"),
    }


# -- plots -----------------------------------------------------------------------------------------


def write_plots(summary: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """Grouped bars of the headline metric per split, and metric-against-length lines where runs
    were evaluated per length. Returns the paths written ([] without matplotlib)."""
    if not plotting.can_plot("the plots"):
        return []
    written = []
    for task, entries in summary.items():
        written.append(_bar_plot(task, entries, out_dir / f"{task}_splits.png"))
        if any(e["lengths"] for e in entries.values()):
            written.append(_length_plot(task, entries, out_dir / f"{task}_lengths.png"))
    return written


def _bar_plot(task: str, entries: dict[str, Any], path: Path) -> Path:
    headline = next(iter(entries.values()))["headline"]
    splits = list(dict.fromkeys(k.split("/")[0] for e in entries.values() for k in e["metrics"]))
    fig = plotting.figure(figsize=(max(5.0, 1.2 * len(splits) * max(1, len(entries)) / 2 + 2), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(entries)
    for i, (label, entry) in enumerate(entries.items()):
        stats = [entry["metrics"].get(f"{s}/{headline}") for s in splits]
        means = [s["mean"] if s else float("nan") for s in stats]
        stds = [s["std"] if s else 0.0 for s in stats]
        xs = [j + (i - (len(entries) - 1) / 2) * width for j in range(len(splits))]
        pairs = list(zip(means, stds, strict=True))
        yerr = [[min(s, m) for m, s in pairs], [min(s, 100 - m) for m, s in pairs]]  # within 0..100 %
        ax.bar(xs, means, width, yerr=yerr, capsize=2, label=f"{label} (n={entry['n']})")
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel(f"{headline} %")
    ax.set_title(f"{task}: {headline} per split (mean ± std over seeds)")
    ax.legend(fontsize="small", ncols=2 if len(entries) > 4 else 1)
    return plotting.save(fig, path, dpi=120)


def _length_plot(task: str, entries: dict[str, Any], path: Path) -> Path:
    metric = next(iter(entries.values()))["headline"]
    fig = plotting.figure(figsize=(7, 3.6))
    ax = fig.subplots()
    boundary = None
    for index, (label, entry) in enumerate(entries.items()):
        points = []
        for split, per_length in entry["lengths"].items():
            for length, metrics in per_length.items():
                if metric in metrics:
                    points.append((int(length), metrics[metric]["mean"], metrics[metric]["std"]))
            if split == "id" and per_length:
                boundary = max(int(n) for n in per_length)
        points.sort()
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.plot(xs, ys, marker=".", label=f"{label} (n={entry['n']})", **plotting.line_style(index))
        if entry["n"] > 1:
            lo = [max(0.0, p[1] - p[2]) for p in points]  # percentages: clip the band to [0, 100]
            hi = [min(100.0, p[1] + p[2]) for p in points]
            ax.fill_between(xs, lo, hi, alpha=0.15, color=plotting.line_style(index)["color"])
    if boundary is not None:
        ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("length")
    ax.set_ylabel(f"{metric} %")
    ax.set_title(f"{task}: {metric} against length")
    ax.legend(fontsize="small")
    return plotting.save(fig, path, dpi=120)
