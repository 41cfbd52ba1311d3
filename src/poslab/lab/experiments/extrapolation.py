"""Length extrapolation of trained language models (the DAPE protocol, docs/tasks.md).

A model trained at length L is scored at L, 2L, 4L, ... on non-overlapping windows of held-out
documents, each window read with its full causal context, and the perplexity is reported over the
last 256 tokens of each window (the DAPE paper's headline, arXiv 2405.14722) and over all tokens.
Every run is scored on the very same windows: they are a function of the data configuration, the
length and ``max_windows`` only (`token_stream.eval_windows`). A finished run keeps its scores in
its ``scores.json`` as each length is scored, so scoring stopped part-way resumes at the next
length; the scores are reused only for the same checkpoint, data, split, windows and settings.

    poslab lm-extrapolation --preset lm_stdlib_small --encodings nope,rope,alibi --seeds 0,1 --out DIR
    poslab extrapolate DIR/runs --lengths 128,256,512,1024 --max-windows 8 --out DIR

The results page is `extrapolation_page`. Long windows stay within bounded memory because
`poslab.attend` runs query blocks (docs/attention.md). Positions an encoding cannot represent
(learned absolute past its table) are recorded as not applicable, not as failures.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from poslab.lab.checkpoint import OutputError, check_writable, json_safe, write_text
from poslab.lab.data.token_stream import HEADLINE_LAST, perplexity
from poslab.lab.experiments.command import NO_PLOTS, THREADS, Command, arg, files_line
from poslab.lab.experiments.extrapolation_page import (
    markdown_tables,
    summarize_extrapolation,
    write_extrapolation_report,
)
from poslab.lab.experiments.grid import plan_grid, train_grid
from poslab.lab.parsing import parse_lengths, parse_seeds, split_top_level
from poslab.lab.presets import get_preset
from poslab.lab.rundir import CHECKPOINT, SCORES, LoadedModel, RunDir, find_trained_runs
from poslab.lab.train import resolve_device
from poslab.model import Transformer

log = logging.getLogger("poslab")

# Windows per model call at length T: max(1, BATCH_TOKENS // T); memory is bounded by the
# attention's query blocks either way, this only amortises per-call overhead at short lengths.
BATCH_TOKENS = 8192


# -- runs ------------------------------------------------------------------------------------------


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (config.json and checkpoint.pt) given directly or found below ``paths``."""
    return find_trained_runs(paths)


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """A trained language-model run, ready to score (`poslab.lab.rundir.RunDir.load_model`).

    Raises ValueError (one line) for a missing directory or config, a corrupt checkpoint, a run that
    is not a language-modelling ('lm') run, or weights that do not fit the config.
    """
    run = RunDir(run_dir).load_model(device=device)
    if run.config.task.name != "lm":
        raise ValueError(
            f"{run_dir} is a {run.config.task.name!r} run; length extrapolation needs a language-model "
            "run (task 'lm', e.g. --preset lm_stdlib_small)"
        )
    return run


# -- lengths and windows ---------------------------------------------------------------------------


def doubling_lengths(train_len: int, max_len: int) -> list[int]:
    """L, 2L, 4L, ... up to ``max_len`` (at least L)."""
    if max_len < train_len:
        raise ValueError(
            f"the largest evaluation length ({max_len}) is below the training length ({train_len})"
        )
    lengths = [train_len]
    while lengths[-1] * 2 <= max_len:
        lengths.append(lengths[-1] * 2)
    return lengths


def default_max_len(train_len: int, device: torch.device | str) -> int:
    """64L on a GPU (the protocol's top), 32L on a CPU (where long windows take minutes)."""
    return train_len * (64 if torch.device(device).type == "cuda" else 32)


def not_applicable(model: Transformer, length: int) -> str | None:
    """Why ``model`` cannot read a window of ``length`` tokens (its encodings' own check), or None."""
    for encoding in model.encodings:
        try:
            encoding.check_length(length - 1)
        except ValueError as error:
            return str(error).split(";")[0]
    return None


def aligned_windows(stream: torch.Tensor, lengths: Sequence[int], n_windows: int) -> dict[int, torch.Tensor]:
    """Windows that end at the same tokens at every length: length T -> (W, T + 1).

    Window k of every length ends at the same position e_k, so the last targets of each window,
    which the headline scores, are the very same tokens at every length and only the context before
    them grows. The e_k are evenly spaced so that the windows of the largest length do not overlap
    (W is capped at what the stream holds). The DAPE protocol (`token_stream.eval_windows`) cuts
    each length into its own non-overlapping windows instead, so its columns score different text.
    """
    top = max(lengths)
    fits = stream.numel() // (top + 1)
    if fits < 1:
        raise ValueError(
            f"the held-out stream ({stream.numel()} tokens) is shorter than a window of {top + 1}"
        )
    n = min(n_windows, fits)
    # Window k of the largest length occupies [k * stride, k * stride + top], stride >= top + 1.
    stride = (stream.numel() - (top + 1)) // max(n - 1, 1) if n > 1 else 0
    ends = torch.arange(n) * stride + top  # index of each window's last token
    out = {}
    for length in lengths:
        index = ends[:, None] - length + torch.arange(length + 1)  # (W, T + 1)
        out[length] = stream[index].long()
    return out


def _check_settings(split: str, max_windows: int | None, last: int) -> None:
    if split not in ("validation", "test"):
        raise ValueError(f"split must be a held-out split, 'validation' or 'test', got {split!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last must be a positive integer, got {last!r}")


def _lengths(
    runs: list[LoadedModel], lengths: Sequence[int] | None, max_len: int | None, device: torch.device
) -> list[int]:
    """The evaluation lengths: ``lengths`` checked, or L, 2L, ... up to ``max_len`` when all runs
    share one training length L."""
    if lengths is not None:
        return parse_lengths(lengths)
    train_lens = sorted({run.train_len for run in runs})
    if len(train_lens) > 1:
        raise ValueError(
            f"the runs have different training lengths {train_lens}; give the lengths explicitly"
        )
    top = max_len if max_len is not None else default_max_len(train_lens[0], device)
    return doubling_lengths(train_lens[0], top)


def _windows(
    data: Any, split: str, lengths: list[int], max_windows: int | None, aligned: bool
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The held-out stream of ``split`` and the windows of every length (length T -> (W, T + 1))."""
    stream = data.stream(split)
    too_long = [n for n in lengths if n + 1 > stream.numel()]
    if too_long:
        raise ValueError(
            f"length(s) {too_long} do not fit in the {split} split ({stream.numel()} tokens); "
            "use shorter lengths or a larger corpus"
        )
    if aligned:
        if max_windows is None:
            raise ValueError("aligned windows need max_windows (how many windows to place)")
        return stream, aligned_windows(stream, lengths, max_windows)
    return stream, {n: data.eval_windows(n, split=split, max_windows=max_windows) for n in lengths}


# -- scoring ---------------------------------------------------------------------------------------


def extrapolate_run(
    run: LoadedModel,
    windows: dict[int, torch.Tensor],
    *,
    last: int = HEADLINE_LAST,
    device: torch.device | str = "cpu",
    batch_tokens: int = BATCH_TOKENS,
) -> dict[int, dict[str, Any]]:
    """Perplexity of one run at every length of ``windows`` (length T -> (W, T + 1) token ids).

    Returns length -> {"status": "ok", "ppl_last", "ppl_all", "nll_last", "nll_all", "n_windows",
    "n_tokens_last", "n_tokens_all", "seconds"} or {"status": "n/a", "reason": ...}.
    """
    out: dict[int, dict[str, Any]] = {}
    for length, win in windows.items():
        reason = not_applicable(run.model, length)
        if reason is not None:
            out[length] = {"status": "n/a", "reason": reason}
            continue
        started = time.monotonic()
        result = perplexity(
            run.model,
            win,
            last=last,
            batch_size=max(1, batch_tokens // length),
            device=device,
        )
        out[length] = {
            "status": "ok",
            "ppl_last": result.last,
            "ppl_all": result.all,
            "nll_last": result.nll_last,
            "nll_all": result.nll_all,
            "n_windows": result.n_windows,
            "n_tokens_last": result.n_tokens_last,
            "n_tokens_all": result.n_tokens_all,
            "seconds": time.monotonic() - started,
        }
        log.info(
            "%s seed %d at %d: ppl last %d %.3f, all %.3f (%d windows, %.0f s)",
            run.label, run.seed, length, min(last, length), result.last, result.all,
            result.n_windows, out[length]["seconds"],
        )  # fmt: skip
    return out


class ScoreCache:
    """A finished run's scores kept in its ``scores.json``: length -> the `extrapolate_run` record,
    under a key naming everything the scores depend on (the checkpoint file's size and time, the
    step, the data, split, windows, scored tokens, batching and device type). Scores under another
    key are ignored, and replaced at the next save. A run directory that cannot be written is
    scored without keeping its scores (a warning says so once)."""

    def __init__(self, run_dir: str | Path, key: dict[str, Any]):
        self.path = Path(run_dir) / SCORES
        stat = (Path(run_dir) / CHECKPOINT).stat()
        self.key = {**key, "checkpoint": [stat.st_size, stat.st_mtime_ns]}
        self.writable = True

    def load(self) -> dict[int, dict[str, Any]]:
        """The kept scores under this key (an unreadable or foreign file counts as none)."""
        try:
            kept = json.loads(self.path.read_text())
            if kept.get("key") != json.loads(json.dumps(self.key)):
                return {}
            return {int(n): r for n, r in kept["results"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, results: dict[int, dict[str, Any]]) -> None:
        """Keep ``results``' lengths whose numbers are finite (a non-finite one is scored again)."""
        if not self.writable:
            return
        keep = {str(n): r for n, r in results.items() if json_safe(r) == r}
        try:
            write_text(self.path, json.dumps({"key": self.key, "results": keep}, indent=1))
        except OutputError as error:
            self.writable = False
            log.warning("scores are not kept (%s); a stopped scoring starts over", error)


def _run_record(run_dir: Path, run: LoadedModel, results: dict[int, Any], seconds: float) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "encoding": run.label,
        "seed": run.seed,
        "step": run.step,
        "train_len": run.train_len,
        "n_params": run.model.n_params(),
        "train_wall_time": RunDir(run_dir).train_wall_time(),
        "eval_seconds": seconds,
        "results": {str(n): r for n, r in results.items()},
    }


def extrapolate(
    run_dirs: Sequence[str | Path],
    *,
    lengths: Sequence[int] | None = None,
    max_len: int | None = None,
    max_windows: int | None = 8,
    split: str = "validation",
    last: int = HEADLINE_LAST,
    device: str = "auto",
    batch_tokens: int = BATCH_TOKENS,
    aligned: bool = False,
) -> dict[str, Any]:
    """Score trained LM runs at several lengths on the same held-out windows.

    Args:
        run_dirs: run directories, or directories holding them (`find_run_dirs`).
        lengths: evaluation lengths; None: L, 2L, ... up to ``max_len`` (default `default_max_len`).
            All runs must then share one training length L.
        max_windows: windows per length at most (evenly spaced over the split; None: all of them).
        split: the held-out split ('validation' or 'test').
        last: the headline scores the last ``last`` targets of each window.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...
        batch_tokens: tokens per model call (windows per call = max(1, batch_tokens // T)).
        aligned: use `aligned_windows` (the same scored tokens at every length, needs
            ``max_windows``) instead of the protocol's own windows per length.

    Returns:
        ``{"settings": ..., "runs": [...], "summary": ...}`` as written to results.json; each run
        has "results" keyed by length (as strings) with the fields of `extrapolate_run`.
    """
    _check_settings(split, max_windows, last)
    dev = resolve_device(device)
    dirs = find_run_dirs(run_dirs)
    runs = [load_run(d, device=dev) for d in dirs]
    if len({run.task.data_key for run in runs}) > 1:
        raise ValueError(
            "the runs were trained on different data (corpus, tokenizer or split); extrapolation "
            "compares runs on one set of held-out windows: pass runs of one data configuration"
        )
    lengths = _lengths(runs, lengths, max_len, dev)
    data = runs[0].task.data
    stream, windows = _windows(data, split, lengths, max_windows, aligned)
    key = {
        "data": runs[0].task.data_key,
        "split": split,
        "windows": {str(n): int(w.shape[0]) for n, w in windows.items()},
        "max_windows": max_windows,
        "aligned": list(lengths) if aligned else False,
        "last": last,
        "batch_tokens": batch_tokens,
        "device": dev.type,
    }
    started = time.monotonic()
    records = []
    for run_dir, run in zip(dirs, runs, strict=True):
        run_started = time.monotonic()
        results = _score_run(run_dir, run, windows, key, last=last, device=dev, batch_tokens=batch_tokens)
        records.append(_run_record(run_dir, run, results, time.monotonic() - run_started))
    settings = {
        "corpus": data.corpus,
        "tokenizer": data.tokenizer.name,
        "data": runs[0].task.data_key,
        "split": split,
        "split_tokens": int(stream.numel()),
        "split_documents": data.n_documents.get(split, 0),
        "lengths": list(lengths),
        "windows": {str(n): int(w.shape[0]) for n, w in windows.items()},
        "max_windows": max_windows,
        "aligned": aligned,
        "last": last,
        "train_lens": sorted({run.train_len for run in runs}),
        "device": str(dev),
        "eval_wall_time": time.monotonic() - started,
    }
    return {"settings": settings, "runs": records, "summary": summarize_extrapolation(records, lengths)}


def _score_run(
    run_dir: Path,
    run: LoadedModel,
    windows: dict[int, torch.Tensor],
    key: dict[str, Any],
    **options: Any,
) -> dict[int, dict[str, Any]]:
    """`extrapolate_run` one length at a time, reusing and keeping a finished run's scores."""
    if not RunDir(run_dir).is_finished():
        return extrapolate_run(run, windows, **options)
    cache = ScoreCache(run_dir, {**key, "step": run.step})
    kept = cache.load()
    results: dict[int, dict[str, Any]] = {}
    for length, win in windows.items():
        if length in kept:
            results[length] = kept[length]
            log.info("%s seed %d at %d: scored earlier (%s)", run.label, run.seed, length, cache.path)
            continue
        results.update(extrapolate_run(run, {length: win}, **options))
        cache.save(results)
    return results


# -- the end-to-end experiment ---------------------------------------------------------------------


def run_experiment(
    preset_name: str,
    encodings: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    lengths: Sequence[int] | None = None,
    max_len: int | None = None,
    max_windows: int | None = 8,
    split: str = "validation",
    overrides: Sequence[str] = (),
    resume: bool = True,
    plots: bool = True,
    device: str = "auto",
    aligned: bool = False,
) -> dict[str, Any]:
    """Train every encoding x seed of an LM preset, then score all runs at every length.

    Runs go to ``out/runs/<encoding>/seed<k>`` (the layout of ``poslab compare``); a finished run
    is reused when ``resume`` is set. The report (`write_extrapolation_report`) goes to ``out``.
    ``max_len`` defaults to the preset's ``eval.extrapolate_to``, else `default_max_len`.
    """
    base = get_preset(preset_name).override(list(overrides))
    if base.task.name != "lm":
        raise ValueError(f"preset {preset_name!r} trains task {base.task.name!r}; use an LM preset (lm_*)")
    if not encodings or not seeds:
        raise ValueError("give at least one encoding and one seed")
    out = Path(out)
    grid = plan_grid(base, encodings, seeds, out / "runs", resume=resume, overwrite=False)
    started = time.monotonic()
    train_grid(grid, resume=resume, progress=False)
    if lengths is None and max_len is None:
        max_len = base.eval.extrapolate_to
    return score_grid(
        [run.path for run in grid],
        out,
        settings={
            "preset": preset_name,
            "overrides": list(overrides),
            "encodings": list(encodings),
            "seeds": list(seeds),
            "train_wall_time_this_call": time.monotonic() - started,
        },
        started=started,
        lengths=lengths,
        max_len=max_len,
        max_windows=max_windows,
        split=split,
        plots=plots,
        device=device,
        aligned=aligned,
    )


def score_grid(
    run_dirs: Sequence[Path],
    out: str | Path,
    *,
    settings: dict[str, Any],
    started: float,
    plots: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """`extrapolate` the trained runs of a grid (``options``: its keywords) and write the report to
    ``out``; ``settings`` (what the grid was: preset, overrides, encodings, seeds, ...) join the
    result's, with ``total_wall_time`` since ``started`` (a `time.monotonic` reading)."""
    result = extrapolate(run_dirs, **options)
    result["settings"].update(settings, total_wall_time=time.monotonic() - started)
    result["files"] = [str(p) for p in write_extrapolation_report(result, out, plots=plots)]
    return result


# -- commands --------------------------------------------------------------------------------------


def _max_windows(args: Any) -> int | None:
    if args.max_windows < 0:
        raise ValueError(f"--max-windows must be >= 0 (0: all windows), got {args.max_windows}")
    return args.max_windows or None


def _window_options(args: Any) -> dict[str, Any]:
    """The options `extrapolate` and `run_experiment` share, from `WINDOW_ARGS`."""
    return {
        "lengths": parse_lengths(args.lengths) if args.lengths else None,
        "max_len": args.max_len,
        "max_windows": _max_windows(args),
        "split": args.split,
        "device": args.device,
        "aligned": args.aligned,
    }


def _extrapolate_command(args: Any) -> str:
    """``poslab extrapolate RUN_DIR... --out DIR``: score existing runs and write the report."""
    check_writable(args.out)  # before the scoring
    result = extrapolate(args.runs, last=args.last, **_window_options(args))
    files = write_extrapolation_report(result, args.out, plots=not args.no_plots)
    wall = result["settings"]["eval_wall_time"]
    return markdown_tables(result) + files_line(
        f"{len(result['runs'])} runs in {wall:.0f} s; ", args.out, files
    )


def _lm_extrapolation_command(args: Any) -> str:
    """``poslab lm-extrapolation --encodings ... --out DIR``: train, score and report."""
    encodings = split_top_level(args.encodings)
    if not encodings:
        raise ValueError("--encodings needs at least one encoding, e.g. --encodings nope,rope,alibi")
    check_writable(args.out)
    result = run_experiment(
        args.preset,
        encodings,
        parse_seeds(args.seeds),
        args.out,
        overrides=list(args.overrides),
        resume=not args.no_resume,
        plots=not args.no_plots,
        **_window_options(args),
    )
    wall = result["settings"]["total_wall_time"]
    return (
        markdown_tables(result)
        + f"{len(result['runs'])} runs; {wall:.0f} s wall time; report in {args.out}\n"
    )


WINDOW_ARGS = (
    arg("--lengths", help="evaluation lengths, e.g. 128,256,512 (default L, 2L, ... to --max-len)"),
    arg(
        "--max-len", type=int, help="largest length for the default doubling (default 64L on GPU, 32L on CPU)"
    ),
    arg("--max-windows", type=int, default=8, help="windows per length at most (default 8; 0: all)"),
    arg("--split", default="validation", choices=("validation", "test"), help="held-out split"),
    arg("--device", default="auto", help="auto, cpu, cuda, cuda:N"),
    NO_PLOTS,
    arg(
        "--aligned",
        action="store_true",
        help="windows of every length end at the same tokens (default: the DAPE protocol's "
        "non-overlapping windows per length)",
    ),
)

COMMANDS = (
    Command(
        "extrapolate",
        "perplexity of trained LM runs at L, 2L, 4L, ... on held-out windows",
        (
            arg("runs", nargs="+", help="run directories, or directories holding runs"),
            arg("--out", required=True, help="where to write table.md, results.csv/json and plots"),
            arg("--last", type=int, default=HEADLINE_LAST, help="headline scores the last N tokens (256)"),
            *WINDOW_ARGS,
        ),
        _extrapolate_command,
    ),
    Command(
        "lm-extrapolation",
        "train LM runs (encodings x seeds) and report their length extrapolation",
        (
            arg("--preset", default="lm_stdlib_small", help="an LM preset (default lm_stdlib_small)"),
            arg(
                "--encodings",
                required=True,
                help="comma-separated specs, e.g. nope,rope,dape[base=kerple_log]",
            ),
            arg("--seeds", default="0", help="seeds: 0,1 or 0-1 (default 0)"),
            arg("--out", required=True, help="output directory (runs/ below it, the report in it)"),
            arg("--no-resume", action="store_true", help="fail instead of reusing finished runs in --out"),
            THREADS,
            *WINDOW_ARGS,
            arg("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=500"),
        ),
        _lm_extrapolation_command,
    ),
)
