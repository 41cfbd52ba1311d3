"""Length extrapolation of trained language models (the DAPE protocol, DESIGN.md section 5).

A model trained at length L is scored at L, 2L, 4L, ... on non-overlapping windows of held-out
documents, each window read with its full causal context, and the perplexity is reported over the
last 256 tokens of each window (the DAPE paper's headline, arXiv 2405.14722) and over all tokens.
Every run is scored on the very same windows: they are a function of the data configuration, the
length and ``max_windows`` only (`poslab.data.lm.eval_windows`).

    poslab lm-extrapolation --preset lm_stdlib_small --encodings nope,rope,alibi --seeds 0,1 --out DIR
    poslab extrapolate DIR/runs --lengths 128,256,512,1024 --max-windows 8 --out DIR

Outputs (`write_extrapolation_report`): ``table.md`` (mean ± sample std over seeds per encoding and
length), ``results.csv`` (one row per run and length), ``results.json`` (settings, runs, summary)
and ``ppl_last.png`` / ``ppl_all.png`` (perplexity against length, log-log, one line per encoding;
skipped with a warning without matplotlib). Long windows stay within bounded memory because
`poslab.attend` runs query blocks (DESIGN.md sections 3 and 4). Positions an encoding cannot
represent (learned absolute past its table) are recorded as not applicable, not as failures.

The module also registers the LM presets (``lm_stdlib_small``, ``lm_paper_128``, ``lm_paper_512``).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poslab import plotting
from poslab.checkpoint import load_checkpoint, write_json, write_text
from poslab.config import EvalConfig, ModelSpec, RunConfig, TaskConfig, TrainConfig
from poslab.data.lm import HEADLINE_LAST, perplexity
from poslab.model import Transformer, build_model
from poslab.presets import preset

log = logging.getLogger("poslab")

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
# Windows per model call at length T: max(1, BATCH_TOKENS // T); memory is bounded by the
# attention's query blocks either way, this only amortises per-call overhead at short lengths.
BATCH_TOKENS = 8192


# -- presets -----------------------------------------------------------------------------------------


def _lm_task(train_len: int, **options: Any) -> TaskConfig:
    return TaskConfig(
        name="lm", options={"corpus": "stdlib", "tokenizer": "bytes", **options}, train_len=train_len
    )


@preset(
    "lm_stdlib_small",
    "CPU, 1-3 min a run on 1 thread: 2 layers d 128, bytes of the Python stdlib at 128 tokens",
)
def lm_stdlib_small() -> RunConfig:
    # Sized on 2 shared CPU cores, 1 thread: 600 steps of batch 16 at 128 tokens took 65 s (ALiBi)
    # to 178 s (CoPE) per run, 25 minutes for 7 encodings x 2 seeds (docs/results/lm_extrapolation).
    return RunConfig(
        model=ModelSpec(d_model=128, n_layers=2, n_heads=4, norm="pre", encoding="rope", max_len=128),
        task=_lm_task(128),
        train=TrainConfig(
            steps=600,
            batch_size=16,
            lr=3e-3,
            warmup=50,
            weight_decay=0.1,
            loss="all",
            log_every=50,
            eval_every=0,
            checkpoint_every=200,
        ),
        eval=EvalConfig(splits=("id", "validation"), batches=4, batch_size=32),
    )


def _paper(train_len: int) -> RunConfig:
    # The DAPE paper's 125M decoder (12 layers, d 768, 12 heads), trained at 128 or 512. The stdlib
    # holds ~11M training bytes, little for 125M parameters: point task.options.corpus at a larger
    # corpus ('files', 'hf') for a faithful run.
    return RunConfig(
        model=ModelSpec(d_model=768, n_layers=12, n_heads=12, norm="pre", encoding="rope", max_len=train_len),
        task=_lm_task(train_len),
        train=TrainConfig(
            steps=20000,
            batch_size=32,
            lr=6e-4,
            warmup=1000,
            weight_decay=0.1,
            loss="all",
            log_every=100,
            eval_every=2000,
            checkpoint_every=1000,
        ),
        eval=EvalConfig(splits=("id", "validation"), batches=8, batch_size=16),
    )


@preset("lm_paper_128", "GPU: the DAPE paper's 125M decoder (12 layers d 768), trained at 128, eval to 8192")
def lm_paper_128() -> RunConfig:
    return _paper(128)


@preset("lm_paper_512", "GPU: the DAPE paper's 125M decoder (12 layers d 768), trained at 512, eval to 8192")
def lm_paper_512() -> RunConfig:
    return _paper(512)


# Largest evaluation length per preset (the lengths are L, 2L, ... up to it). The paper evaluates
# both of its training lengths up to 8192; --max-len raises it (64L = 32768 for lm_paper_512).
PRESET_MAX_LEN = {"lm_stdlib_small": 4096, "lm_paper_128": 8192, "lm_paper_512": 8192}


# -- loading runs --------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A trained LM run ready to score: its model (eval mode), task and identification."""

    run_dir: Path
    config: RunConfig
    model: Transformer
    task: Any  # poslab.tasks.lm.LMTask
    step: int

    @property
    def label(self) -> str:
        return self.config.encoding_label

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def train_len(self) -> int:
        return int(self.config.task.train_len)


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (config.json and checkpoint.pt) given directly or found below ``paths``."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"no such run directory: {path}")
        if (path / CONFIG).is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob(CONFIG) if (p.parent / CHECKPOINT).exists())
        if not below:
            raise ValueError(f"{path} is not a run directory and holds none ({CONFIG} + {CHECKPOINT})")
        found.extend(below)
    return list(dict.fromkeys(found))


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a run's model from its checkpoint (read with ``weights_only``, nothing executed).

    The model is built from the config stored in the checkpoint (the one its weights belong to).
    Raises ValueError (one line) for a missing directory or config, a corrupt checkpoint, a run that
    is not a language-modelling ('lm') run, or weights that do not fit the config.
    """
    from poslab.train import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"no such run directory: {run_dir}")
    load_run_config(run_dir)  # a run directory has a readable config.json
    state = load_checkpoint(run_dir / CHECKPOINT)  # CheckpointError is a ValueError
    try:
        config = RunConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{run_dir / CHECKPOINT} holds an unusable config: {error}") from None
    if config.task.name != "lm":
        raise ValueError(
            f"{run_dir} is a {config.task.name!r} run; length extrapolation needs a language-model "
            "run (task 'lm', e.g. --preset lm_stdlib_small)"
        )
    task = config.task.build()
    model = build_model(config.model_config(task))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{run_dir / CHECKPOINT}: weights do not fit its config ({first[:120]})") from None
    model.to(device).eval()
    return LoadedRun(run_dir, config, model, task, int(state["step"]))


# -- lengths and windows ---------------------------------------------------------------------------------


def parse_lengths(text: str | Sequence[int]) -> list[int]:
    """``'128,256,512'`` (or a list) -> sorted distinct positive lengths; ValueError otherwise."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--lengths takes positive integers such as 128,256,512, got {text!r}") from None
    else:
        values = list(text)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"lengths must be positive integers such as 128,256,512, got {text!r}")
    return sorted(set(values))


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
    (W is capped at what the stream holds). The DAPE protocol (`poslab.data.lm.eval_windows`) cuts
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


# -- evaluation ------------------------------------------------------------------------------------------


def extrapolate_run(
    run: LoadedRun,
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
    from poslab.train import resolve_device

    if split not in ("validation", "test"):
        raise ValueError(f"split must be a held-out split, 'validation' or 'test', got {split!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last must be a positive integer, got {last!r}")
    dev = resolve_device(device)
    dirs = find_run_dirs(run_dirs)
    runs = [load_run(d, device=dev) for d in dirs]
    keys = {run.task.data_key for run in runs}
    if len(keys) > 1:
        raise ValueError(
            "the runs were trained on different data (corpus, tokenizer or split); extrapolation "
            "compares runs on one set of held-out windows: pass runs of one data configuration"
        )
    train_lens = sorted({run.train_len for run in runs})
    if lengths is None:
        if len(train_lens) > 1:
            raise ValueError(
                f"the runs have different training lengths {train_lens}; give the lengths explicitly"
            )
        top = max_len if max_len is not None else default_max_len(train_lens[0], dev)
        lengths = doubling_lengths(train_lens[0], top)
    else:
        lengths = parse_lengths(lengths)
    data = runs[0].task.data
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
        windows = aligned_windows(stream, lengths, max_windows)
    else:
        windows = {n: data.eval_windows(n, split=split, max_windows=max_windows) for n in lengths}
    started = time.monotonic()
    records = []
    for run in runs:
        run_started = time.monotonic()
        results = extrapolate_run(run, windows, last=last, device=dev, batch_tokens=batch_tokens)
        records.append(
            {
                "run_dir": str(run.run_dir),
                "encoding": run.label,
                "seed": run.seed,
                "step": run.step,
                "train_len": run.train_len,
                "n_params": run.model.n_params(),
                "train_wall_time": _train_wall_time(run.run_dir),
                "eval_seconds": time.monotonic() - run_started,
                "results": {str(n): r for n, r in results.items()},
            }
        )
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
        "train_lens": train_lens,
        "device": str(dev),
        "eval_wall_time": time.monotonic() - started,
    }
    return {"settings": settings, "runs": records, "summary": summarize_extrapolation(records, lengths)}


def _train_wall_time(run_dir: Path) -> float | None:
    from poslab.train import load_results

    try:
        return float(load_results(run_dir)["wall_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summarize_extrapolation(records: list[dict[str, Any]], lengths: Sequence[int]) -> dict[str, Any]:
    """Per encoding (in order of appearance): seeds and, per length, mean/std/n of ppl_last and
    ppl_all over the seeds, or "n/a" when no seed could be scored at that length."""
    from poslab.report import mean_std

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


# -- reporting -------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    """A number that is not NaN or infinite (results read back from JSON hold None for those)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(entry: dict[str, Any], metric: str) -> str:
    if entry["status"] != "ok":
        return "n/a"
    stats = entry[metric]
    if not _finite(stats["mean"]):
        return "inf" if stats["n"] else "–"
    digits = 2 if stats["mean"] < 1000 else 0
    if stats["n"] == 1 or not _finite(stats["std"]):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


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
    for label, entry in result["summary"].items():
        xs, ys, es = [], [], []
        for n in settings["lengths"]:
            cell = entry["lengths"][str(n)]
            if cell["status"] == "ok" and _finite(cell[metric]["mean"]):
                xs.append(n)
                ys.append(cell[metric]["mean"])
                es.append(cell[metric]["std"] if _finite(cell[metric]["std"]) else 0.0)
        if xs:
            ax.errorbar(
                xs, ys, yerr=es, marker="o", markersize=4, capsize=3, label=f"{label} (n={entry['n']})"
            )
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
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "table.md", out_dir / "results.csv", out_dir / "results.json"]
    write_text(files[0], markdown_tables(result))
    write_text(files[1], results_csv(result))
    write_json(files[2], result)
    if plots:
        for metric, name in (("ppl_last", "ppl_last.png"), ("ppl_all", "ppl_all.png")):
            written = plot_extrapolation(result, out_dir / name, metric=metric)
            if written is not None:
                files.append(written)
    return files


# -- the end-to-end experiment ---------------------------------------------------------------------------


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
    ``max_len`` defaults to `PRESET_MAX_LEN` for the LM presets, else `default_max_len`.
    """
    from poslab.presets import get_preset
    from poslab.train import plan_grid, run_status, train

    base = get_preset(preset_name).override(list(overrides))
    if base.task.name != "lm":
        raise ValueError(f"preset {preset_name!r} trains task {base.task.name!r}; use an LM preset (lm_*)")
    if not encodings or not seeds:
        raise ValueError("give at least one encoding and one seed")
    out = Path(out)
    grid = plan_grid(base, encodings, seeds, out / "runs", resume=resume, overwrite=False)
    started = time.monotonic()
    for config, run_dir in grid:
        if resume and run_status(run_dir) == "finished":
            log.info("%s is finished; reusing it", run_dir)
            continue
        train(config, run_dir, resume=resume, progress=False)
    train_wall = time.monotonic() - started
    if lengths is None and max_len is None:
        max_len = PRESET_MAX_LEN.get(preset_name)
    result = extrapolate(
        [d for _, d in grid],
        lengths=lengths,
        max_len=max_len,
        max_windows=max_windows,
        split=split,
        device=device,
        aligned=aligned,
    )
    result["settings"].update(
        preset=preset_name,
        overrides=list(overrides),
        encodings=list(encodings),
        seeds=list(seeds),
        train_wall_time_this_call=train_wall,
        total_wall_time=time.monotonic() - started,
    )
    result["files"] = [str(p) for p in write_extrapolation_report(result, out, plots=plots)]
    return result


# -- command line (hooked into poslab.cli) ---------------------------------------------------------------


def add_extrapolate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extrapolate`` and ``lm-extrapolation`` subcommands (each sets ``run``)."""

    def shared(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--lengths", help="evaluation lengths, e.g. 128,256,512 (default L, 2L, ... to --max-len)"
        )
        p.add_argument(
            "--max-len",
            type=int,
            help="largest length for the default doubling (default 64L on GPU, 32L on CPU)",
        )
        p.add_argument(
            "--max-windows", type=int, default=8, help="windows per length at most (default 8; 0: all)"
        )
        p.add_argument("--split", default="validation", choices=("validation", "test"), help="held-out split")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        p.add_argument(
            "--aligned",
            action="store_true",
            help="windows of every length end at the same tokens (default: the DAPE protocol's "
            "non-overlapping windows per length)",
        )

    p = subparsers.add_parser(
        "extrapolate", help="perplexity of trained LM runs at L, 2L, 4L, ... on held-out windows"
    )
    p.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    p.add_argument("--out", required=True, help="where to write table.md, results.csv/json and plots")
    p.add_argument("--last", type=int, default=HEADLINE_LAST, help="headline scores the last N tokens (256)")
    shared(p)
    p.set_defaults(run=cmd_extrapolate)

    p = subparsers.add_parser(
        "lm-extrapolation", help="train LM runs (encodings x seeds) and report their length extrapolation"
    )
    p.add_argument("--preset", default="lm_stdlib_small", help="an LM preset (default lm_stdlib_small)")
    p.add_argument(
        "--encodings", required=True, help="comma-separated specs, e.g. nope,rope,dape[base=kerple_log]"
    )
    p.add_argument("--seeds", default="0", help="seeds: 0,1 or 0-1 (default 0)")
    p.add_argument("--out", required=True, help="output directory (runs/ below it, the report in it)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of reusing finished runs in --out")
    shared(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=500")
    p.set_defaults(run=cmd_lm_extrapolation)


def _max_windows(args: argparse.Namespace) -> int | None:
    if args.max_windows < 0:
        raise ValueError(f"--max-windows must be >= 0 (0: all windows), got {args.max_windows}")
    return args.max_windows or None


def cmd_extrapolate(args: argparse.Namespace) -> int:
    """``poslab extrapolate RUN_DIR... --out DIR``: score existing runs and write the report."""
    result = extrapolate(
        args.runs,
        lengths=parse_lengths(args.lengths) if args.lengths else None,
        max_len=args.max_len,
        max_windows=_max_windows(args),
        split=args.split,
        last=args.last,
        device=args.device,
        aligned=args.aligned,
    )
    files = write_extrapolation_report(result, args.out, plots=not args.no_plots)
    print(markdown_tables(result), end="")
    wall = result["settings"]["eval_wall_time"]
    names = ", ".join(p.name for p in files)
    print(f"{len(result['runs'])} runs in {wall:.0f} s; report in {args.out}: {names}")
    return 0


def cmd_lm_extrapolation(args: argparse.Namespace) -> int:
    """``poslab lm-extrapolation --encodings ... --out DIR``: train, score and report."""
    from poslab.cli import parse_seeds, split_top_level

    encodings = split_top_level(args.encodings)
    if not encodings:
        raise ValueError("--encodings needs at least one encoding, e.g. --encodings nope,rope,alibi")
    result = run_experiment(
        args.preset,
        encodings,
        parse_seeds(args.seeds),
        args.out,
        lengths=parse_lengths(args.lengths) if args.lengths else None,
        max_len=args.max_len,
        max_windows=_max_windows(args),
        split=args.split,
        overrides=list(args.overrides),
        resume=not args.no_resume,
        plots=not args.no_plots,
        device=args.device,
        aligned=args.aligned,
    )
    print(markdown_tables(result), end="")
    wall = result["settings"]["total_wall_time"]
    print(f"{len(result['runs'])} runs; {wall:.0f} s wall time; report in {args.out}")
    return 0
