"""The page of a DAPE language-model study (`poslab.lab.experiments.lm_study`): ``README.md`` and
``results.csv`` from its parts' extrapolation results (`poslab.lab.experiments.extrapolation`).

The README holds the command, machines, wall time, seeds, the last-256-token perplexity per part and
length (mean ± sample std and every seed at the longest length), each part's plot, the paper's
numbers beside ours at the same multiple of the training length, and, where the study names two
rows, their gap at the longest length per part, paired by seed.
"""

from __future__ import annotations

import contextlib
import csv
import io
from typing import Any

from poslab.lab.experiments.lm_studies import LMStudy, StudyPart
from poslab.lab.report.common import csv_value, finite, mean_std, stats_cell
from poslab.lab.rundir import RunDir


def _part_lengths(result: dict[str, Any]) -> list[int]:
    return list(result["settings"]["lengths"])


def _row_names(study: LMStudy) -> dict[str, str]:
    """Encoding label (as the runs record it) -> the study's row name."""
    return {spec: row for row, spec in study.rows}


def _seed_values(result: dict[str, Any], spec: str, length: int) -> dict[int, float]:
    """seed -> last-256 perplexity of ``spec``'s runs at ``length`` (the scored ones)."""
    values = {}
    for run in result["runs"]:
        cell = run["results"].get(str(length), {})
        if run["encoding"] == spec and cell.get("status") == "ok":
            values[run["seed"]] = cell["ppl_last"]
    return values


def _cell(result: dict[str, Any], spec: str, length: int) -> str:
    values = _seed_values(result, spec, length)
    return stats_cell(mean_std(list(values.values()))) if values else "n/a"


def _about(result: dict[str, Any]) -> dict[str, Any]:
    """Parameters, steps, learning rates, machines and wall times of a part's runs."""
    machines: dict[str, int] = {}
    steps, params, lrs, train_s = set(), set(), set(), 0.0
    for run in result["runs"]:
        run_dir = RunDir(run["run_dir"])
        try:
            machine = run_dir.load_results().get("machine") or {}
        except ValueError:
            machine = {}
        with contextlib.suppress(ValueError):  # a run without its config shows '?'
            lrs.add(run_dir.load_config().train.lr)
        key = f"{machine.get('cpu', 'not recorded')}, {machine.get('threads', '?')} thread(s)"
        machines[key] = machines.get(key, 0) + 1
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


def _part_section(study: LMStudy, part: StudyPart, result: dict[str, Any]) -> list[str]:
    lengths = _part_lengths(result)
    about = _about(result)
    top = lengths[-1]
    settings = result["settings"]
    lines = [
        f"## {part.name}",
        "",
        " ".join([f"`{part.preset}`", *(f"`{o}`" for o in part.overrides)])
        + f": {settings['corpus']}, {settings['tokenizer']} tokens, "
        f"{'/'.join(map(str, sorted(about['params'])))} parameters, "
        f"{'/'.join(map(str, sorted(about['steps'])))} steps. Training {about['train_s'] / 3600:.2f} h "
        f"(summed over runs), scoring {about['eval_s'] / 3600:.2f} h; machines: "
        + "; ".join(f"{key} ({count} runs)" for key, count in about["machines"].items())
        + ".",
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
        f"Every seed at {top} ({top // lengths[0]}x):",
        "",
        "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for row, spec in study.rows:
        values = _seed_values(result, spec, top)
        cells = [f"{values[s]:.2f}" if s in values and finite(values[s]) else "–" for s in seeds]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"![perplexity against length]({part.name}/ppl_last.png)", ""]
    return lines


def _paired_gaps(result: dict[str, Any], new: str, base: str, length: int) -> dict[int, float]:
    """seed -> ``new`` minus ``base`` at ``length``, over the seeds both have."""
    a, b = _seed_values(result, new, length), _seed_values(result, base, length)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _gap_lines(study: LMStudy, results: dict[str, dict[str, Any]]) -> list[str]:
    """Per part: the two rows at the longest length and their difference, paired by seed, and the
    difference at the training length beside it (a gap already there is not about extrapolation)."""
    new, base = study.gap
    lines = [
        f"## The gap at the longest length: {new} minus {base}",
        "",
        "Negative: DAPE is better. The gap's mean ± sample std is over the seeds both rows have; the "
        "last column is the same gap at the training length, where no extrapolation is involved.",
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
        about = _about(result)
        gaps = _paired_gaps(result, study.spec(new), study.spec(base), top)
        at_train = _paired_gaps(result, study.spec(new), study.spec(base), lengths[0])
        params = {run["n_params"] for run in result["runs"] if run["encoding"] == study.spec(base)}
        cells = [
            part.name,
            "/".join(map(str, sorted(params))),
            "/".join(map(str, sorted(about["steps"]))),
            "/".join(f"{lr:g}" for lr in sorted(about["lrs"])) or "?",
            str(top),
            _cell(result, study.spec(base), top),
            _cell(result, study.spec(new), top),
            stats_cell(mean_std(list(gaps.values()))),
            ", ".join(f"{g:+.2f}" for g in gaps.values()) or "–",
            stats_cell(mean_std(list(at_train.values()))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paper_lines(study: LMStudy, results: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's numbers and ours at the same multiple of the training length."""
    parts = [part.name for part in study.parts if part.name in results]
    lines = [
        "## The paper's numbers beside ours",
        "",
        "The paper's models, corpora and training lengths differ from ours (see the setting above): "
        "ours are at the same multiple of our training length. Compare the pattern, not the values. "
        "The paper's values are as the reproduction issue quotes them.",
        "",
        "| paper's setting | row | at | paper | " + " | ".join(f"ours ({p})" for p in parts) + " |",
        "|---|---|---|---|" + "---|" * len(parts),
    ]
    for number in study.numbers:
        ratio = number.length / number.train_len
        cells = []
        for name in parts:
            result = results[name]
            length = int(result["settings"]["train_lens"][0] * ratio)
            known = length in _part_lengths(result)
            cells.append(f"{_cell(result, study.spec(number.row), length)} at {length}" if known else "–")
        lines.append(
            f"| {number.setting} | {number.row} | {number.length} ({ratio:g}x) | {number.value:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def study_page(
    study: LMStudy, results: dict[str, dict[str, Any]], *, command: str, notes: str | None = None
) -> str:
    """The README of a study from its parts' extrapolation results (part name -> result), ending
    with ``notes``, the reading written by hand."""
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
    abouts = [_about(result) for result in results.values()]
    lines += [
        f"Compute: training {sum(a['train_s'] for a in abouts) / 3600:.2f} h and scoring "
        f"{sum(a['eval_s'] for a in abouts) / 3600:.2f} h, summed over runs (the machines are per part).",
        "",
    ]
    if missing:
        lines += [f"**Incomplete**: no results yet for {', '.join(missing)}; rerun the command.", ""]
    if study.gap is not None:
        lines += _gap_lines(study, results)
    if study.numbers:
        lines += _paper_lines(study, results)
    for part in study.parts:
        if part.name in results:
            lines += _part_section(study, part, results[part.name])
    lines += ["## Reading", "", notes or "_Not written yet._", ""]
    return "\n".join(lines)


def study_csv(study: LMStudy, results: dict[str, dict[str, Any]]) -> str:
    """One row per part, run and length: the row name, seed and both perplexities."""
    names = _row_names(study)
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
