"""The results page of LM length extrapolation (`poslab.lab.experiments.extrapolation`), built from the
shared pieces of `poslab.lab.report.common`.

``table.md`` (mean ± sample std over seeds per encoding and length, for the last-256-token and the
all-token perplexity), ``results.csv`` (one row per run and length), ``results.json`` (settings,
runs, summary) and ``ppl_last.png`` / ``ppl_all.png`` (perplexity against length, log-log, one line
per encoding; skipped with a warning without matplotlib).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poslab.lab import plotting
from poslab.lab.report.common import finite, mean_std, stats_cell, write_page


def load_extrapolation_results(path: str | Path) -> dict[str, Any]:
    """An extrapolation's results.json (``{"settings", "runs", "summary"}``, as `write_extrapolation_report`
    writes it), read back; ValueError (one line) naming the file when it is not valid JSON or not of
    that shape (``[]``, ``"settings": "x"``, a run whose ``results`` is not an object), instead of a
    traceback in the page built from it. The studies read their parts' results with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such results file: {path}") from None
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    check_extrapolation_results(data, path)
    return data


def check_extrapolation_results(data: Any, path: str | Path) -> None:
    """ValueError naming ``path`` unless ``data`` has the shape `load_extrapolation_results` expects."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is not an extrapolation's results ({what})")

    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    for key in ("settings", "summary"):
        if not isinstance(data.get(key), dict):
            raise bad(f"{key!r} is {data.get(key)!r}")
    if not isinstance(data.get("runs"), list):
        raise bad(f"'runs' is {data.get('runs')!r}")
    for i, run in enumerate(data["runs"]):
        if not isinstance(run, dict):
            raise bad(f"runs[{i}] is {run!r}")
        if not isinstance(run.get("results"), dict) or not all(
            isinstance(cell, dict) for cell in run["results"].values()
        ):
            raise bad(f"runs[{i}].results is {run.get('results')!r}")
        if not isinstance(run.get("encoding"), str):
            raise bad(f"runs[{i}].encoding is {run.get('encoding')!r}")


def summarize_extrapolation(records: list[dict[str, Any]], lengths: Sequence[int]) -> dict[str, Any]:
    """Per encoding (in order of appearance): seeds and, per length, mean/std/n of ppl_last and
    ppl_all over the seeds, or "n/a" when no seed could be scored at that length."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["encoding"], []).append(record)
    summary: dict[str, Any] = {}
    for label, group in groups.items():
        per_length: dict[str, Any] = {}
        for n in lengths:
            results = [r["results"][str(n)] for r in group]
            ok = [r for r in results if r["status"] == "ok"]
            if not ok:
                per_length[str(n)] = {"status": "n/a", "reason": results[0].get("reason", "")}
                continue
            per_length[str(n)] = {
                "status": "ok",
                "ppl_last": mean_std([r["ppl_last"] for r in ok]),
                "ppl_all": mean_std([r["ppl_all"] for r in ok]),
            }
        summary[label] = {"seeds": [r["seed"] for r in group], "n": len(group), "lengths": per_length}
    return summary


def _cell(entry: dict[str, Any], metric: str) -> str:
    return stats_cell(entry[metric]) if entry["status"] == "ok" else "n/a"


def markdown_tables(result: dict[str, Any]) -> str:
    """Two Markdown tables (last-``last``-token and all-token perplexity): encodings by lengths."""
    settings, summary = result["settings"], result["summary"]
    lengths = [str(n) for n in settings["lengths"]]
    windows = ", ".join(f"{n}: {settings['windows'][n]}" for n in lengths)
    blocks = []
    for metric, what in (
        ("ppl_last", f"the last {settings['last']} tokens of each window"),
        ("ppl_all", "all tokens of each window"),
    ):
        lines = [
            f"**Perplexity on {what}** ({settings['split']} split of {settings['corpus']}, "
            f"{settings['tokenizer']} tokens, trained at {'/'.join(map(str, settings['train_lens']))}; "
            "mean ± sample std over n seeds; lower is better; n/a: the encoding cannot represent "
            "the length).",
            "",
            "| encoding | n | " + " | ".join(lengths) + " |",
            "|---|---|" + "---|" * len(lengths),
        ]
        for label, entry in summary.items():
            cells = [_cell(entry["lengths"][n], metric) for n in lengths]
            lines.append(f"| {label} | {entry['n']} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    how = (
        "aligned: every length's windows end at the same tokens, so a column differs from the next "
        "only in the context before the scored tokens"
        if settings.get("aligned")
        else "the DAPE protocol's non-overlapping windows of each length, evenly spaced over the split "
        "(so different lengths score different text)"
    )
    blocks.append(f"Windows per length (the same for every run): {windows}; {how}.")
    return "\n\n".join(blocks) + "\n"


def results_csv(result: dict[str, Any]) -> str:
    """One row per (run, length): identification, status and the perplexities."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = [
        "ppl_last",
        "ppl_all",
        "nll_last",
        "nll_all",
        "n_windows",
        "n_tokens_last",
        "n_tokens_all",
        "seconds",
    ]
    writer.writerow(["encoding", "seed", "run_dir", "train_len", "length", "status", *fields])
    for run in result["runs"]:
        for length, r in run["results"].items():
            row = [run["encoding"], run["seed"], run["run_dir"], run["train_len"], length, r["status"]]
            writer.writerow(row + [("" if r.get(f) is None else repr(r[f])) for f in fields])
    return out.getvalue()


def plot_extrapolation(result: dict[str, Any], path: str | Path, *, metric: str = "ppl_last") -> Path | None:
    """Perplexity against evaluation length (log-log), one line per encoding with ±std bars; None
    (and a warning) without matplotlib."""
    if not plotting.can_plot("the plots"):
        return None
    from matplotlib.ticker import ScalarFormatter

    settings = result["settings"]
    fig = plotting.figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for index, (label, entry) in enumerate(result["summary"].items()):
        xs, ys, es = [], [], []
        for n in settings["lengths"]:
            cell = entry["lengths"][str(n)]
            if cell["status"] == "ok" and finite(cell[metric]["mean"]):
                xs.append(n)
                ys.append(cell[metric]["mean"])
                es.append(cell[metric]["std"] if finite(cell[metric]["std"]) else 0.0)
        if xs:
            ax.errorbar(
                xs, ys, yerr=es, marker="o", markersize=4, capsize=3, label=f"{label} (n={entry['n']})",
                **plotting.line_style(index),
            )  # fmt: skip
    for train_len in settings["train_lens"]:
        ax.axvline(train_len, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(settings["lengths"], [str(n) for n in settings["lengths"]])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("evaluation length (tokens)")
    what = f"last {settings['last']} tokens" if metric == "ppl_last" else "all tokens"
    ax.set_ylabel(f"perplexity ({what})")
    ax.set_title(
        f"{settings['corpus']} ({settings['split']}), trained at {'/'.join(map(str, settings['train_lens']))}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return plotting.save(fig, path, dpi=120)


def write_extrapolation_report(
    result: dict[str, Any], out_dir: str | Path, *, plots: bool = True
) -> list[Path]:
    """Write table.md, results.csv, results.json and (with ``plots``) ppl_last.png and ppl_all.png."""
    out_dir = Path(out_dir)
    files = write_page(out_dir, table=markdown_tables(result), csv=results_csv(result), data=result)
    if plots:
        for metric, name in (("ppl_last", "ppl_last.png"), ("ppl_all", "ppl_all.png")):
            written = plot_extrapolation(result, out_dir / name, metric=metric)
            if written is not None:
                files.append(written)
    return files
