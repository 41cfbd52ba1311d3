"""The ``poslab`` command line (also ``python -m poslab``).

    poslab list [encodings|tasks|presets]
    poslab train --preset NAME [KEY=VALUE ...] [--out DIR] [--resume | --overwrite]
    poslab eval CHECKPOINT [eval.KEY=VALUE ...] [--json FILE]
    poslab compare --preset NAME --encodings E1,E2,... [--seeds 0,1] --out DIR [KEY=VALUE ...]
    poslab report RUN_DIR [RUN_DIR ...] --out DIR
    poslab demo [--out DIR] [--seeds 0]

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
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from poslab.config import RunConfig, format_value, slug
from poslab.presets import DEMO_ENCODINGS, DESCRIPTIONS, get_preset, list_presets
from poslab.progress import ProgressLogHandler

log = logging.getLogger("poslab")

EVAL_KEYS = ("eval.", "train.device")


class UsageError(ValueError):
    """A command-line mistake (reported like any other user error)."""


# -- helpers ---------------------------------------------------------------------------------------


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``'rope,dape[base=fire,width=16]'`` -> 2 items."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def parse_seeds(text: str) -> list[int]:
    """``'0,1,2'`` or a range ``'0-2'`` -> [0, 1, 2]."""
    try:
        if re.fullmatch(r"\d+-\d+", text.strip()):
            low, high = map(int, text.split("-"))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes integers such as 0,1,2 or 0-2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds takes non-negative integers such as 0,1,2, got {text!r}")
    return list(dict.fromkeys(seeds))


def preset_config(preset: str | None, overrides: Sequence[str]) -> RunConfig:
    if preset is None:
        raise UsageError("give --preset NAME (see `poslab list presets`)")
    return get_preset(preset).override(list(overrides))


def setup_logging(quiet: bool) -> None:
    handler = ProgressLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers = [h for h in log.handlers if not isinstance(h, ProgressLogHandler)]
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


# -- subcommands -----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from poslab.encodings import encoding_class, encoding_options, list_encodings
    from poslab.tasks import TASKS, list_tasks

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
    from poslab.report import RunRecord, markdown_table, summarize
    from poslab.train import CONFIG, RunDirError, load_run_config, resumable_change, train

    out = Path(args.out) if args.out else None
    if args.resume and out is not None and (out / CONFIG).exists():
        config = load_run_config(out).override(list(args.overrides))
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
        record = RunRecord(out, config.task.name, config.encoding_label, config.train.seed, result.results)
        print(markdown_table(summarize([record])), end="")
        print(f"run: {out}  ({result.results['wall_time']:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from poslab.checkpoint import load_checkpoint, write_json
    from poslab.evaluate import evaluate, headline_metric
    from poslab.model import build_model
    from poslab.report import RunRecord, markdown_table, summarize
    from poslab.train import load_model_state, resolve_device

    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith(EVAL_KEYS)]
    if bad:
        raise UsageError(f"eval takes only eval.* and train.device options, got {', '.join(bad)}")
    state = load_checkpoint(args.checkpoint)
    config = RunConfig.from_dict(state["config"]).override(list(args.overrides))
    task = config.task.build()
    model = build_model(config.model_config(task))
    load_model_state(model, state, args.checkpoint)
    device = resolve_device(config.train.device)
    model.to(device)
    started = time.monotonic()
    metrics = evaluate(model, task, config.eval, train_len=config.task.train_len, device=device)
    results = {
        "task": config.task.name,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "step": int(state["step"]),
        "checkpoint": str(args.checkpoint),
        "chance": task.chance,
        "headline": headline_metric(metrics["splits"]),
        "metrics": metrics,
        "eval_time": time.monotonic() - started,
    }
    record = RunRecord(Path(args.checkpoint), results["task"], results["encoding"], results["seed"], results)
    print(markdown_table(summarize([record])), end="")
    print(f"checkpoint step {results['step']}, evaluated in {results['eval_time']:.1f} s")
    if args.json:
        write_json(args.json, results)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    encodings = split_top_level(args.encodings)
    if not encodings:
        raise UsageError("--encodings needs at least one encoding, e.g. --encodings nope,rope,cope")
    return run_compare(
        preset=args.preset,
        encodings=encodings,
        seeds=parse_seeds(args.seeds),
        overrides=list(args.overrides),
        out=Path(args.out),
        args=args,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    return run_compare(
        preset="flipflop_demo",
        encodings=list(DEMO_ENCODINGS),
        seeds=parse_seeds(args.seeds),
        overrides=list(args.overrides),
        out=Path(args.out),
        args=args,
    )


def run_compare(
    *,
    preset: str | None,
    encodings: list[str],
    seeds: list[int],
    overrides: list[str],
    out: Path,
    args: argparse.Namespace,
) -> int:
    """Train every (encoding, seed) of the grid under ``out``, then write and print the report."""
    from poslab.checkpoint import write_json
    from poslab.report import load_runs, write_report
    from poslab.train import plan_grid, run_status

    base = preset_config(preset, overrides)
    grid = plan_grid(base, encodings, seeds, out, resume=args.resume, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "grid.json",
        {"preset": preset, "encodings": encodings, "seeds": seeds, "overrides": overrides},
    )
    started = time.monotonic()
    todo = [(c, d) for c, d in grid if not (args.resume and run_status(d) == "finished")]
    if len(todo) < len(grid):
        log.info("%d of %d runs already finished; resuming the rest", len(grid) - len(todo), len(grid))
    jobs = max(1, min(args.jobs, len(todo))) if todo else 1
    if jobs == 1:
        from poslab.train import train

        for config, run_dir in todo:
            train(
                config,
                run_dir,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=_progress(args),
            )
    else:
        _train_parallel(todo, jobs, args)
    report = write_report(load_runs([d for _, d in grid]), out, plots=not args.no_plots)
    wall = time.monotonic() - started
    print(report["table"], end="")
    print(f"{len(grid)} runs ({len(todo)} trained) in {wall:.0f} s wall time; report in {out}")
    return 0


def _train_parallel(todo: list, jobs: int, args: argparse.Namespace) -> None:
    """Train runs in ``jobs`` worker processes, splitting the CPU threads between them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    quiet = log.level > logging.INFO
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(threads, quiet)
    ) as pool:
        futures = [
            pool.submit(_train_worker, c.to_dict(), str(d), args.resume, args.overwrite) for c, d in todo
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a failed run stops the grid: runs not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_init(threads: int, quiet: bool) -> None:
    import torch

    from poslab.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(threads)
    setup_logging(quiet)


def _train_worker(config: dict, run_dir: str, resume: bool, overwrite: bool) -> None:
    from poslab.train import train

    train(RunConfig.from_dict(config), run_dir, resume=resume, overwrite=overwrite, progress=False)


def cmd_report(args: argparse.Namespace) -> int:
    from poslab.report import load_runs, write_report

    report = write_report(load_runs(args.runs), Path(args.out), plots=not args.no_plots)
    print(report["table"], end="")
    print(f"report in {args.out}: {', '.join(p.name for p in report['files'])}")
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

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="dotted overrides, e.g. train.steps=200",
        )

    def run_flags(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--resume", action="store_true", help="continue existing run(s)")
        group.add_argument("--overwrite", action="store_true", help="replace existing run(s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train one run")
    p.add_argument("--preset", help="named configuration (poslab list presets)")
    p.add_argument("--out", help="run directory (default runs/PRESET_ENCODING_seedN)")
    run_flags(p)
    overrides(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (a file or a run directory)")
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--json", help="also write the results to this JSON file")
    overrides(p)
    p.set_defaults(run=cmd_eval)

    def grid_flags(p: argparse.ArgumentParser, default_jobs: int = 1) -> None:
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

    p = sub.add_parser("compare", help="train a grid of encodings x seeds and report")
    p.add_argument("--preset", help="named configuration (poslab list presets)")
    p.add_argument("--encodings", required=True, help="comma-separated specs, e.g. nope,rope,dape[base=fire]")
    p.add_argument("--out", required=True, help="output directory (one subdirectory per run)")
    grid_flags(p)
    run_flags(p)
    overrides(p)
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
    grid_flags(p, default_jobs=min(2, os.cpu_count() or 1))
    run_flags(p)
    overrides(p)
    p.set_defaults(run=cmd_demo)

    # Subcommands that live with their modules: LM length extrapolation and visualisation.
    from poslab.extrapolate import add_extrapolate_parser
    from poslab.visualize import add_visualize_parser

    add_extrapolate_parser(sub)
    add_visualize_parser(sub)

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
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from poslab.bench import run_bench

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    run_bench(sections, out=args.out, quick=args.quick, device=args.device)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from poslab.runtime import tune_allocator
    from poslab.train import NonFiniteLossError

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
