"""``poslab lm-study NAME --out DIR``: the DAPE paper's language-model studies at CPU scale.

A study (arXiv 2405.14722; V2: arXiv 2410.04798) is data: its rows (a name and poslab's encoding
spec), its parts (one `poslab lm-extrapolation` grid each: a preset and overrides, e.g. the code and
the prose corpus, or one model size), how far past the training length it scores (64 times, the
paper's 128 -> 8192) and the paper's numbers. Each part trains its grid at ``OUT/<part>/runs`` and
writes its own extrapolation report in ``OUT/<part>`` (`poslab.experiments.extrapolation`). The
command resumes: finished runs are reused, and so is a part's scoring when its results.json scored
the same grid (encodings, seeds, overrides, lengths, windows) of finished runs; delete it to
rescore. ``OUT/README.md`` gathers them: the command, machines, wall time, seeds, the last-256-token
perplexity per length (mean ± sample std and every seed), the plots, the paper's numbers beside ours
at the same multiple of the training length, and, where the study names two rows to compare, their
gap at the longest length per part (paired by seed).

The paper's models are 125M and 350M parameters trained on Arxiv and Books3; ours are 0.5M to 7M
parameters trained on the Python standard library or the Python documentation. Compare the pattern
(which encodings blow up, which keep improving with context), not the values.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poslab.checkpoint import check_writable, write_text
from poslab.experiments.command import NO_PLOTS, THREADS, Command, arg
from poslab.experiments.extrapolation import doubling_lengths, run_experiment
from poslab.options import parse_seeds
from poslab.presets import get_preset
from poslab.report.common import csv_value, finite, mean_std, stats_cell
from poslab.runs import RunDir


@dataclass(frozen=True, kw_only=True)
class StudyPart:
    """One grid of a study: ``name`` names its folder, ``preset`` and ``overrides`` its config."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PaperNumber:
    """A perplexity the paper reports: ``row`` in ``setting`` (model, corpus), trained at
    ``train_len`` and scored at ``length``. The page sets ours at the same multiple beside it."""

    setting: str
    row: str
    train_len: int
    length: int
    value: float


@dataclass(frozen=True, kw_only=True)
class LMStudy:
    """A study: ``rows`` (name, encoding spec), ``parts``, scored at L, 2L, ... up to ``factor``
    times the training length; ``gap``: two rows (a DAPE variant, its base) whose difference at the
    longest length the page tabulates per part; ``numbers``: the paper's."""

    name: str
    title: str
    source: str
    rows: tuple[tuple[str, str], ...]
    parts: tuple[StudyPart, ...]
    paper_setting: str
    factor: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    gap: tuple[str, str] | None = None
    numbers: tuple[PaperNumber, ...] = ()

    def __post_init__(self) -> None:
        names = [row for row, _ in self.rows]
        if len(set(names)) < len(names) or len({spec for _, spec in self.rows}) < len(self.rows):
            raise ValueError(f"study {self.name}: every row needs its own name and spec")
        if len({part.name for part in self.parts}) < len(self.parts):
            raise ValueError(f"study {self.name}: two parts share a name")
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"study {self.name}: factor must be a power of two, got {self.factor}")
        if self.gap is not None and (len(self.gap) != 2 or set(self.gap) - set(names)):
            raise ValueError(f"study {self.name}: gap must name two of its rows, got {self.gap!r}")
        unknown = {number.row for number in self.numbers} - set(names)
        if unknown:
            raise ValueError(f"study {self.name}: paper numbers for rows it does not have: {sorted(unknown)}")

    def spec(self, row: str) -> str:
        return dict(self.rows)[row]


STUDIES: dict[str, LMStudy] = {}


def _register(study: LMStudy) -> LMStudy:
    STUDIES[study.name] = study
    return study


def get_study(name: str) -> LMStudy:
    """The study called ``name``; ValueError naming the known ones otherwise."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


# -- the studies -----------------------------------------------------------------------------------

# The paper's numbers as the reproduction issue quotes them (the DAPE paper's length-extrapolation
# tables; the 350M corpus is not named there), not re-read from the paper here: check them against
# the paper's tables before citing.
_PROSE = ("task.options.corpus=python_docs", "task.options.tokenizer=bpe")
_SOURCE = "DAPE paper (arXiv 2405.14722) and DAPE V2 (arXiv 2410.04798)"
_ARXIV_128 = "125M, Arxiv, trained at 128"
_BOOKS_512 = "125M, Books3, trained at 512"
_LARGE_512 = "350M, trained at 512"
_KERPLE_NUMBERS = (
    PaperNumber(setting=_ARXIV_128, row="Kerple", train_len=128, length=8192, value=31.93),
    PaperNumber(setting=_ARXIV_128, row="DAPE-Kerple", train_len=128, length=8192, value=5.00),
    PaperNumber(setting=_BOOKS_512, row="Kerple", train_len=512, length=8192, value=39.31),
    PaperNumber(setting=_BOOKS_512, row="DAPE-Kerple", train_len=512, length=8192, value=17.88),
    PaperNumber(setting=_LARGE_512, row="Kerple", train_len=512, length=8192, value=22.76),
    PaperNumber(setting=_LARGE_512, row="DAPE-Kerple", train_len=512, length=8192, value=3.43),
)
_CPU_SETTING = (
    "here `lm_stdlib_small` (2 layers, d 128, 4 heads, 0.46M parameters, 600 steps of 16 windows of "
    "128 tokens, about 0.1 epoch), scored on 8 non-overlapping validation windows per length"
)

_register(
    LMStudy(
        name="dape_extrapolation",
        title="Length extrapolation: trained at 128, perplexity on the last 256 tokens up to 64x",
        source=_SOURCE,
        rows=(
            ("NoPE", "nope"),
            ("RoPE", "rope"),
            ("T5", "t5"),
            ("ALiBi", "alibi"),
            ("Kerple", "kerple_log"),
            ("FIRE", "fire"),
            ("DAPE-ALiBi", "dape[base=alibi]"),
            ("DAPE-Kerple", "dape[base=kerple_log]"),
            ("DAPE-FIRE", "dape[base=fire]"),
            ("DAPE V2-Kerple", "dape[base=kerple_log,kernel_size=3]"),
            ("CoPE (not in the paper)", "cope"),
        ),
        parts=(
            StudyPart(name="stdlib", preset="lm_stdlib_small"),
            StudyPart(name="python_docs", preset="lm_stdlib_small", overrides=_PROSE),
        ),
        gap=("DAPE-Kerple", "Kerple"),
        numbers=(
            *_KERPLE_NUMBERS,
            PaperNumber(setting=_LARGE_512, row="ALiBi", train_len=512, length=8192, value=4.21),
            PaperNumber(setting=_LARGE_512, row="DAPE-ALiBi", train_len=512, length=8192, value=3.57),
        ),
        paper_setting="the paper trains 125M and 350M decoders on Arxiv and Books3 at 128 or 512 "
        f"tokens and scores up to 8192; {_CPU_SETTING}: bytes of the Python standard library "
        "(`stdlib`) and 4096 BPE tokens of the Python documentation's reST sources (`python_docs`)",
    )
)

_register(
    LMStudy(
        name="dape_scale",
        title="Scale: does the DAPE-Kerple minus Kerple gap at 64x grow with the model and training?",
        source=_SOURCE,
        rows=(("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")),
        parts=(
            StudyPart(name="x1", preset="lm_stdlib_small"),
            StudyPart(name="x4", preset="lm_stdlib_x4"),
            StudyPart(name="x16", preset="lm_stdlib_x16"),
            StudyPart(name="x1_steps4", preset="lm_stdlib_small", overrides=("train.steps=2400",)),
            StudyPart(name="x4_steps4", preset="lm_stdlib_x4", overrides=("train.steps=2400",)),
        ),
        gap=("DAPE-Kerple", "Kerple"),
        numbers=_KERPLE_NUMBERS,
        paper_setting="in the paper Kerple degrades past the training length while DAPE-Kerple keeps "
        f"improving, at 125M and 350M parameters; {_CPU_SETTING}. The parts widen it to d 256 "
        "(`lm_stdlib_x4`, 1.7M parameters) and d 512 (`lm_stdlib_x16`, 6.6M) and train 4 times longer "
        "(2400 steps, about 0.4 epoch), the learning rate unchanged",
    )
)

_register(
    LMStudy(
        name="dape_width",
        title="The width D of DAPE's MLP (DAPE-ALiBi, trained at 128)",
        source=_SOURCE,
        rows=(
            ("ALiBi", "alibi"),
            ("DAPE-ALiBi D=4", "dape[base=alibi,width=4]"),
            ("DAPE-ALiBi D=16", "dape[base=alibi,width=16]"),
            ("DAPE-ALiBi D=32", "dape[base=alibi,width=32]"),
            ("DAPE-ALiBi D=64", "dape[base=alibi,width=64]"),
        ),
        parts=(StudyPart(name="stdlib", preset="lm_stdlib_small"),),
        numbers=(
            PaperNumber(setting=_ARXIV_128, row="ALiBi", train_len=128, length=128, value=8.31),
            PaperNumber(setting=_ARXIV_128, row="ALiBi", train_len=128, length=8192, value=5.85),
            PaperNumber(setting=_ARXIV_128, row="DAPE-ALiBi D=4", train_len=128, length=128, value=8.25),
            PaperNumber(setting=_ARXIV_128, row="DAPE-ALiBi D=4", train_len=128, length=8192, value=5.67),
        ),
        paper_setting=f"the paper sweeps D over 4 to 64 with a 125M model trained at 128; {_CPU_SETTING} "
        "(DAPE's default D is 32)",
    )
)

_register(
    LMStudy(
        name="dape_ablation",
        title="Which terms DAPE needs: A + B, A + f(B), A + f(A, B), A + B + f(A, B) over Kerple",
        source=_SOURCE,
        rows=(
            ("A+B (Kerple)", "kerple_log"),
            ("A+f(B)", "dape[base=kerple_log,form=A+f(B)]"),
            ("A+f(A,B)", "dape[base=kerple_log,form=A+f(A,B)]"),
            ("A+B+f(A,B) (DAPE-Kerple)", "dape[base=kerple_log]"),
        ),
        parts=(StudyPart(name="stdlib", preset="lm_stdlib_small"),),
        paper_setting="A: the attention logits, B: Kerple's bias, f: DAPE's MLP; the paper ablates them "
        f"with a 125M model; {_CPU_SETTING} (no numbers of the paper's ablation are recorded here yet)",
    )
)


# -- running ---------------------------------------------------------------------------------------


def _part_lengths(result: dict[str, Any]) -> list[int]:
    return list(result["settings"]["lengths"])


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
    parts' results.json back) and write ``out/README.md`` and ``out/results.csv``.

    Returns {"page": the README text, "results": part name -> its extrapolation result}.
    """
    study = get_study(name)
    out = Path(out)
    check_writable(out)
    seeds = list(study.seeds) if seeds is None else seeds
    specs = [spec for _, spec in study.rows]
    for part in study.parts:  # a bad override fails before any part trains
        get_preset(part.preset).override([*part.overrides, *overrides])
    results = {}
    for part in study.parts:
        folder = out / part.name
        part_overrides = [*part.overrides, *overrides]
        train_len = get_preset(part.preset).override(part_overrides).task.train_len
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
    page = study_page(study, results, command=command or f"poslab lm-study {name} --out {out}")
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


# -- the page --------------------------------------------------------------------------------------


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
    """Parameters, steps, machines and wall times of a part's runs."""
    machines: dict[str, int] = {}
    steps, params, train_s = set(), set(), 0.0
    for run in result["runs"]:
        try:
            machine = RunDir(run["run_dir"]).load_results().get("machine") or {}
        except ValueError:
            machine = {}
        key = f"{machine.get('cpu', 'not recorded')}, {machine.get('threads', '?')} thread(s)"
        machines[key] = machines.get(key, 0) + 1
        steps.add(run["step"])
        params.add(run["n_params"])
        train_s += run["train_wall_time"] or 0.0
    eval_s = sum(run["eval_seconds"] for run in result["runs"])
    return {"machines": machines, "steps": steps, "params": params, "train_s": train_s, "eval_s": eval_s}


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


def _gap_lines(study: LMStudy, results: dict[str, dict[str, Any]]) -> list[str]:
    """Per part: the two rows at the longest length and their difference, paired by seed."""
    new, base = study.gap
    lines = [
        f"## The gap at the longest length: {new} minus {base}",
        "",
        "Negative: DAPE is better. The gap's mean ± sample std is over the seeds both rows have.",
        "",
        f"| part | parameters ({base}) | steps | length | {base} | {new} | gap | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part in study.parts:
        if part.name not in results:
            continue
        result = results[part.name]
        top = _part_lengths(result)[-1]
        about = _about(result)
        a, b = _seed_values(result, study.spec(new), top), _seed_values(result, study.spec(base), top)
        gaps = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
        params = {run["n_params"] for run in result["runs"] if run["encoding"] == study.spec(base)}
        cells = [
            part.name,
            "/".join(map(str, sorted(params))),
            "/".join(map(str, sorted(about["steps"]))),
            str(top),
            _cell(result, study.spec(base), top),
            _cell(result, study.spec(new), top),
            stats_cell(mean_std(list(gaps.values()))),
            ", ".join(f"{g:+.2f}" for g in gaps.values()) or "–",
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


def study_page(study: LMStudy, results: dict[str, dict[str, Any]], *, command: str) -> str:
    """The README of a study from its parts' extrapolation results (part name -> result)."""
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
