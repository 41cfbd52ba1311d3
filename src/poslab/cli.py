"""The ``poslab`` command line (also ``python -m poslab``): argparse and printing only; the work
is done by `poslab.train`, `poslab.experiments`, `poslab.report`, `poslab.visualize` and
`poslab.bench`.

    poslab list [encodings|tasks|presets]
    poslab train --preset NAME [KEY=VALUE ...] [--out DIR] [--resume | --overwrite]
    poslab eval CHECKPOINT [eval.KEY=VALUE ...] [--json FILE]
    poslab compare --preset NAME --encodings E1,E2,... [--seeds 0,1] --out DIR [KEY=VALUE ...]
    poslab report RUN_DIR [RUN_DIR ...] --out DIR
    poslab demo [--out DIR] [--seeds 0]
    poslab lm-extrapolation --encodings E1,E2,... --out DIR   /   poslab extrapolate RUN_DIR... --out DIR
    poslab visualize RUN_DIR --out DIR
    poslab bench [--quick]

KEY=VALUE options override the preset with dotted keys (``model.encoding=cope``,
``train.steps=200``, ``task.options.p=0.9``). Errors a user can cause (an unknown task, preset,
encoding or option, a corrupt checkpoint, a run directory that already holds a run) print one
line, ``poslab: error: ...``, and exit with status 2; a run that diverges exits with status 1.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from poslab.checkpoint import write_json
from poslab.config import RunConfig, format_value, slug
from poslab.data.lm import HEADLINE_LAST
from poslab.encodings import encoding_class, encoding_options, list_encodings
from poslab.evaluate import evaluate
from poslab.experiments.compare import compare
from poslab.experiments.extrapolation import extrapolate, run_experiment
from poslab.experiments.extrapolation_page import markdown_tables, write_extrapolation_report
from poslab.options import parse_int_list, parse_lengths, parse_seeds, split_list, split_top_level
from poslab.presets import DEMO_ENCODINGS, DESCRIPTIONS, get_preset, list_presets
from poslab.progress import setup_logging
from poslab.report.runs import RunRecord, load_runs, markdown_table, summarize, write_report
from poslab.runs import CONFIG, RunDir, RunDirError, load_model, resumable_change
from poslab.runtime import tune_allocator
from poslab.tasks import TASKS, list_tasks
from poslab.train import NonFiniteLossError, resolve_device, train
from poslab.visualize import visualize_run

log = logging.getLogger("poslab")

EVAL_KEYS = ("eval.", "train.device")

__all__ = ["build_parser", "main", "split_top_level"]


class UsageError(ValueError):
    """A command-line mistake (reported like any other user error)."""


def preset_config(preset: str | None, overrides: Sequence[str]) -> RunConfig:
    if preset is None:
        raise UsageError("give --preset NAME (see `poslab list presets`)")
    return get_preset(preset).override(list(overrides))


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _print_runs(records: list[RunRecord]) -> None:
    print(markdown_table(summarize(records)), end="")


def _print_page(table: str, lead: str, out: str, files: list[Path]) -> None:
    """A results page's table, then ``<lead>report in OUT: table.md, ...``."""
    print(table, end="")
    print(f"{lead}report in {out}: {', '.join(p.name for p in files)}")


# -- subcommands: single runs ----------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    out = []
    if what in (None, "encodings"):
        out.append("encodings (compose with '+', options as name[key=value]):")
        for name in list_encodings():
            options = encoding_options(encoding_class(name))
            text = ", ".join(f"{k}={format_value(v)}" for k, v in options.items())
            out.append(f"  {name:<14} {text}".rstrip())
    if what in (None, "tasks"):
        out.append("tasks (options as task.options.KEY=VALUE):")
        for name in list_tasks():
            cls = TASKS[name]
            params = inspect.signature(cls.__init__).parameters.values()
            text = ", ".join(
                f"{p.name}={format_value(p.default)}" for p in params if p.kind is p.KEYWORD_ONLY
            )
            kind = "decoder" if cls.causal else "encoder"
            out.append(f"  {name:<26} {kind:<8} {text}".rstrip())
    if what in (None, "presets"):
        out.append("presets (poslab train --preset NAME):")
        for name in list_presets():
            out.append(f"  {name:<22} {DESCRIPTIONS[name]}")
    print("\n".join(out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if args.resume and out is not None and (out / CONFIG).exists():
        config = RunDir(out).load_config().override(list(args.overrides))
        if args.preset is not None:
            wanted = preset_config(args.preset, args.overrides)
            changed = [k for k in wanted.diff(config) if not resumable_change(k)]
            if changed:
                raise RunDirError(
                    f"{out} holds a run whose config differs from --preset {args.preset} in "
                    f"{', '.join(changed)}; drop --preset to continue the saved run"
                )
    else:
        config = preset_config(args.preset, args.overrides)
    if out is None:
        out = Path("runs") / f"{args.preset}_{slug(config.encoding_label)}_seed{config.train.seed}"
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=_progress(args))
    if result.results.get("metrics"):  # process 0
        _print_runs(
            [RunRecord(out, config.task.name, config.encoding_label, config.train.seed, result.results)]
        )
        print(f"run: {out}  ({result.results['wall_time']:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith(EVAL_KEYS)]
    if bad:
        raise UsageError(f"eval takes only eval.* and train.device options, got {', '.join(bad)}")
    loaded = load_model(args.checkpoint, overrides=args.overrides)
    config, task = loaded.config, loaded.task
    device = resolve_device(config.train.device)
    loaded.model.to(device)
    started = time.monotonic()
    metrics = evaluate(loaded.model, task, config.eval, train_len=config.task.train_len, device=device)
    results = {
        "task": config.task.name,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "step": loaded.step,
        "checkpoint": str(args.checkpoint),
        "chance": task.chance,
        "headline": task.headline,
        "metrics": metrics,
        "eval_time": time.monotonic() - started,
    }
    _print_runs(
        [RunRecord(Path(args.checkpoint), results["task"], results["encoding"], results["seed"], results)]
    )
    print(f"checkpoint step {results['step']}, evaluated in {results['eval_time']:.1f} s")
    if args.json:
        write_json(args.json, results)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = write_report(load_runs(args.runs), Path(args.out), plots=not args.no_plots)
    _print_page(report["table"], "", args.out, report["files"])
    return 0


# -- subcommands: experiments ----------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    encodings = split_top_level(args.encodings)
    if not encodings:
        raise UsageError("--encodings needs at least one encoding, e.g. --encodings nope,rope,cope")
    return _compare(args.preset, encodings, args)


def cmd_demo(args: argparse.Namespace) -> int:
    return _compare("flipflop_demo", list(DEMO_ENCODINGS), args)


def _compare(preset: str | None, encodings: list[str], args: argparse.Namespace) -> int:
    """Train every (encoding, seed) of the grid under ``--out``, then write and print the report."""
    if preset is None:
        raise UsageError("give --preset NAME (see `poslab list presets`)")
    result = compare(
        preset,
        encodings,
        parse_seeds(args.seeds),
        Path(args.out),
        overrides=list(args.overrides),
        resume=args.resume,
        overwrite=args.overwrite,
        jobs=args.jobs,
        plots=not args.no_plots,
        progress=_progress(args),
    )
    print(result.report["table"], end="")
    print(
        f"{result.n_runs} runs ({result.n_trained} trained) in {result.wall_time:.0f} s wall time; "
        f"report in {Path(args.out)}"
    )
    return 0


def _max_windows(args: argparse.Namespace) -> int | None:
    if args.max_windows < 0:
        raise ValueError(f"--max-windows must be >= 0 (0: all windows), got {args.max_windows}")
    return args.max_windows or None


def _window_options(args: argparse.Namespace) -> dict:
    """The options `extrapolate` and `run_experiment` share, from the shared flags."""
    return {
        "lengths": parse_lengths(args.lengths) if args.lengths else None,
        "max_len": args.max_len,
        "max_windows": _max_windows(args),
        "split": args.split,
        "device": args.device,
        "aligned": args.aligned,
    }


def cmd_extrapolate(args: argparse.Namespace) -> int:
    """``poslab extrapolate RUN_DIR... --out DIR``: score existing runs and write the report."""
    result = extrapolate(args.runs, last=args.last, **_window_options(args))
    files = write_extrapolation_report(result, args.out, plots=not args.no_plots)
    wall = result["settings"]["eval_wall_time"]
    _print_page(markdown_tables(result), f"{len(result['runs'])} runs in {wall:.0f} s; ", args.out, files)
    return 0


def cmd_lm_extrapolation(args: argparse.Namespace) -> int:
    """``poslab lm-extrapolation --encodings ... --out DIR``: train, score and report."""
    encodings = split_top_level(args.encodings)
    if not encodings:
        raise ValueError("--encodings needs at least one encoding, e.g. --encodings nope,rope,alibi")
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
    print(markdown_tables(result), end="")
    wall = result["settings"]["total_wall_time"]
    print(f"{len(result['runs'])} runs; {wall:.0f} s wall time; report in {args.out}")
    return 0


# -- subcommands: tools ----------------------------------------------------------------------------


def cmd_visualize(args: argparse.Namespace) -> int:
    """``poslab visualize RUN_DIR --out DIR``."""
    text = args.text
    if args.text_file is not None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read --text-file {args.text_file}: {error}") from None
    layers = parse_int_list(args.layers, "--layers", "0,1") if args.layers else None
    try:
        paths = visualize_run(
            args.run_dir,
            args.out,
            kind=args.kind,
            layers=layers,
            length=args.length,
            query=args.query,
            text=text,
            split=args.split,
        )
    except ImportError as error:
        raise ValueError(str(error)) from None
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from poslab.bench import run_bench  # loads the native kernels' build machinery: only when asked

    sections = split_list(args.sections)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    run_bench(sections, out=args.out, quick=args.quick, device=args.device)
    print(f"wrote {args.out}")
    return 0


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poslab",
        description="Position encodings for transformers: train, evaluate and compare them.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="list encodings, tasks and presets")
    p.add_argument("what", nargs="?", choices=("encodings", "tasks", "presets"))
    p.set_defaults(run=cmd_list)
    _add_run_parsers(sub)
    _add_compare_parsers(sub)
    _add_extrapolation_parsers(sub)
    _add_visualize_parser(sub)
    _add_bench_parser(sub)
    return parser


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=200")


def _run_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue existing run(s)")
    group.add_argument("--overwrite", action="store_true", help="replace existing run(s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _grid_flags(p: argparse.ArgumentParser, default_jobs: int = 1) -> None:
    p.add_argument("--seeds", default="0", help="seeds: 0,1,2 or 0-2 (default 0)")
    p.add_argument(
        "--jobs",
        type=int,
        default=default_jobs,
        help="runs trained at once, in worker processes that share the CPU cores between "
        f"them (default {default_jobs}); small models train faster this way than with "
        "several threads each",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _add_run_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run")
    p.add_argument("--preset", help="named configuration (poslab list presets)")
    p.add_argument("--out", help="run directory (default runs/PRESET_ENCODING_seedN)")
    _run_flags(p)
    _overrides(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (a file or a run directory)")
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--json", help="also write the results to this JSON file")
    _overrides(p)
    p.set_defaults(run=cmd_eval)


def _add_compare_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train a grid of encodings x seeds and report")
    p.add_argument("--preset", help="named configuration (poslab list presets)")
    p.add_argument("--encodings", required=True, help="comma-separated specs, e.g. nope,rope,dape[base=fire]")
    p.add_argument("--out", required=True, help="output directory (one subdirectory per run)")
    _grid_flags(p)
    _run_flags(p)
    _overrides(p)
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("report", help="table and plots from existing run directories")
    p.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    p.add_argument("--out", required=True, help="where to write the report")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser(
        "demo",
        help=f"flip-flop ID/OOD with {', '.join(DEMO_ENCODINGS)} (preset flipflop_demo)",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    _grid_flags(p, default_jobs=min(2, os.cpu_count() or 1))
    _run_flags(p)
    _overrides(p)
    p.set_defaults(run=cmd_demo)


def _window_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `_window_options`, shared by ``extrapolate`` and ``lm-extrapolation``."""
    p.add_argument("--lengths", help="evaluation lengths, e.g. 128,256,512 (default L, 2L, ... to --max-len)")
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


def _add_extrapolation_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extrapolate", help="perplexity of trained LM runs at L, 2L, 4L, ... on held-out windows"
    )
    p.add_argument("runs", nargs="+", help="run directories, or directories holding runs")
    p.add_argument("--out", required=True, help="where to write table.md, results.csv/json and plots")
    p.add_argument("--last", type=int, default=HEADLINE_LAST, help="headline scores the last N tokens (256)")
    _window_flags(p)
    p.set_defaults(run=cmd_extrapolate)

    p = sub.add_parser(
        "lm-extrapolation", help="train LM runs (encodings x seeds) and report their length extrapolation"
    )
    p.add_argument("--preset", default="lm_stdlib_small", help="an LM preset (default lm_stdlib_small)")
    p.add_argument(
        "--encodings", required=True, help="comma-separated specs, e.g. nope,rope,dape[base=kerple_log]"
    )
    p.add_argument("--seeds", default="0", help="seeds: 0,1 or 0-1 (default 0)")
    p.add_argument("--out", required=True, help="output directory (runs/ below it, the report in it)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of reusing finished runs in --out")
    _window_flags(p)
    _overrides(p)
    p.set_defaults(run=cmd_lm_extrapolation)


def _add_visualize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="plot DAPE's learned bias or CoPE's positions of a run")
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a trained LM run directory (config.json + checkpoint.pt)"
    )
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--kind", default="auto", choices=("auto", "dape", "cope"))
    p.add_argument("--layers", help="comma-separated layers (default all)")
    p.add_argument("--length", type=int, help="window length in tokens (default 4L for DAPE, L for CoPE)")
    p.add_argument("--query", type=int, default=-1, help="query position (default the last)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to read (default: held-out text with the most sentence ends)")
    text.add_argument("--text-file", help="read the text from this file")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.set_defaults(run=cmd_visualize)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and memory ratios against SDPA / the RoPE model, measured side by side in one run",
    )
    p.add_argument(
        "--sections",
        default="attention,step,decode,memory",
        help="comma-separated: attention, step, decode, memory (default all)",
    )
    p.add_argument("--out", default="runs/bench.json", help="JSON output (default runs/bench.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a first look")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(run=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    tune_allocator()  # process-wide, so only here and in workers, never on import of the library
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals; KEY=VALUE options after a flag arrive here.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.quiet)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"poslab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"poslab: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("poslab: interrupted; continue a run with --resume", file=sys.stderr)
        return 130


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
