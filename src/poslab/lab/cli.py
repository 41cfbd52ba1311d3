"""The ``poslab`` command line (also ``python -m poslab``): argparse and printing only; the work
is done by `poslab.lab.train`, `poslab.lab.experiments`, `poslab.lab.studies`, `poslab.lab.report`,
`poslab.lab.visualize` and `poslab.lab.bench`.

    poslab list [encodings|tasks|presets]
    poslab train --preset NAME [KEY=VALUE ...] [--out DIR] [--resume | --overwrite]
    poslab eval CHECKPOINT [eval.KEY=VALUE ...] [--json FILE]
    poslab compare --preset NAME --encodings E1,E2,... [--seeds 0,1] --out DIR [KEY=VALUE ...]
    poslab report RUN_DIR [RUN_DIR ...] --out DIR   (run folders, or runs a data file records)
    poslab record DIR                  (DIR's finished run folders, appended to DIR/data.jsonl)
    poslab demo [--out DIR] [--seeds 0]
    poslab lm-extrapolation --encodings E1,E2,... --out DIR   /   poslab extrapolate RUN_DIR... --out DIR
    poslab study NAME [--out DIR] [--page-only]   (also: poslab reproduce NAME, poslab lm-study NAME)
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
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from poslab.allocator import tune_allocator
from poslab.encodings import encoding_class, encoding_options, list_encodings
from poslab.lab.checkpoint import check_writable, output_error, write_json
from poslab.lab.config import RunConfig, format_value, slug
from poslab.lab.evaluate import evaluate, planned_lengths
from poslab.lab.experiments import COMMANDS as EXPERIMENT_COMMANDS
from poslab.lab.experiments.command import OVERRIDES, RUN_FLAGS, THREADS, Command, arg, progress
from poslab.lab.memory import check_fits
from poslab.lab.parsing import parse_int_list, split_list
from poslab.lab.parsing import split_top_level as split_top_level  # the command line's spec lists
from poslab.lab.presets import DESCRIPTIONS, get_preset, list_presets
from poslab.lab.progress import setup_logging
from poslab.lab.report.runs_page import RunRecord, markdown_table, summarize
from poslab.lab.rundir import CONFIG, RunDir, RunDirError, load_model, results_record, resumable_change
from poslab.lab.studies.runner import COMMANDS as STUDY_COMMANDS
from poslab.lab.tasks import TASKS, list_tasks
from poslab.lab.train import NonFiniteLossError, resolve_device, train
from poslab.lab.visualize import visualize_run

EVAL_KEYS = ("eval.", "train.device")


def preset_config(preset: str | None, overrides: Sequence[str]) -> RunConfig:
    if preset is None:
        raise ValueError("give --preset NAME (see `poslab list presets`)")
    return get_preset(preset).override(list(overrides))


def _runs_table(record: RunRecord) -> str:
    return markdown_table(summarize([record]))


# -- the commands of single runs and the tools -----------------------------------------------------


def cmd_list(args: Any) -> str:
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
    return "\n".join(out) + "\n"


def cmd_train(args: Any) -> str:
    out = Path(args.out) if args.out else None
    if args.resume and out is not None and RunDir(out).status() == "empty":
        raise RunDirError(f"--resume: {out} holds no run to continue; drop --resume to start one there")
    if args.resume and out is not None and (out / CONFIG).exists():
        # The run continues from its own config; only the options given contradict it (the
        # preset it was started from had its own overrides, which config.json records).
        saved = RunDir(out).load_config()
        config = saved.override(list(args.overrides))
        changed = [k for k in config.diff(saved) if not resumable_change(k)]
        if changed:
            raise RunDirError(
                f"{out} holds a run with a different config ({', '.join(changed)}); "
                "use another --out or --overwrite"
            )
        if args.preset is not None and get_preset(args.preset).task.name != saved.task.name:
            raise RunDirError(
                f"{out} holds a {saved.task.name} run, not one of --preset {args.preset} "
                f"(task {get_preset(args.preset).task.name}); drop --preset to continue it"
            )
    else:
        config = preset_config(args.preset, args.overrides)
    if out is None:
        out = Path("runs") / f"{args.preset}_{slug(config.encoding_label)}_seed{config.train.seed}"
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=progress(args))
    if not result.results.get("metrics"):  # not process 0
        return ""
    record = RunRecord(out, config.task.name, config.encoding_label, config.train.seed, result.results)
    return _runs_table(record) + f"run: {out}  ({result.results['wall_time']:.0f} s)\n"


def _probe_config(
    config: RunConfig, trained_task: Any, name: str, options: list[str]
) -> tuple[RunConfig, Any]:
    """``config`` with its task replaced by ``name`` (the training length kept, every split of the
    probe) and ``options`` (dotted ``task.options.*`` and ``eval.splits`` assignments) applied, and
    that task, which must read and write the trained task's tokens: same names, same ids, same
    causality (a byte LM scored on a byte probe)."""
    data = config.to_dict()
    data["task"] = {**data["task"], "name": name, "options": {}, "train_pool": 0}
    data["eval"]["splits"] = None  # the trained task's split names mean nothing to the probe
    probe_config = RunConfig.from_dict(data).override(options)
    task = probe_config.task.build()
    for what in ("tokens", "output_tokens", "causal"):
        if getattr(task, what) != getattr(trained_task, what):
            raise ValueError(
                f"--task {name}: its {what.replace('_', ' ')} differ from those of the task the "
                f"checkpoint was trained on ({config.task.name}), so the model cannot be scored on it"
            )
    return probe_config, task


def cmd_eval(args: Any) -> str:
    # With --task, the probe's options and splits apply once the task is the probe's.
    probe_keys = ("task.options.", "eval.splits") if args.task else ()
    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith(EVAL_KEYS + probe_keys)]
    if bad:
        allowed = "eval.*, train.device" + (" and task.options.*" if args.task else "")
        raise ValueError(f"eval takes only {allowed} options, got {', '.join(bad)}")
    probe_options = [o for o in args.overrides if o.strip().startswith(probe_keys)]  # none without --task
    eval_options = [o for o in args.overrides if o not in probe_options]
    if args.json:
        if Path(args.json).is_dir():
            raise ValueError(
                f"--json {args.json} is a directory; give a file, e.g. {Path(args.json) / 'eval.json'}"
            )
        check_writable(Path(args.json).parent)
    loaded = load_model(args.checkpoint, overrides=eval_options)
    config, task = loaded.config, loaded.task
    about: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    if args.task:
        about["trained_on"] = config.task.name
        config, task = _probe_config(config, task, args.task, probe_options)
    device = resolve_device(config.train.device)
    lengths = planned_lengths(task, config.eval, config.task.train_len)
    check_fits(config, task, device, eval_lengths=lengths, training=False)
    splits = ", ".join(config.eval.splits or task.splits())
    logging.getLogger("poslab").info(
        "evaluating %s on %s at length(s) %s, %d batch(es) of %d each",
        args.checkpoint, splits, ", ".join(map(str, lengths)), config.eval.batches, config.eval.batch_size,
    )  # fmt: skip
    loaded.model.to(device)
    started = time.monotonic()
    metrics = evaluate(loaded.model, task, config.eval, train_len=config.task.train_len, device=device)
    results = results_record(
        config,
        task,
        step=loaded.step,
        metrics=metrics,
        about=about,
        timing={"eval_time": time.monotonic() - started},
    )
    if args.json:
        write_json(args.json, results)
    record = RunRecord(Path(args.checkpoint), results["task"], results["encoding"], results["seed"], results)
    return (
        _runs_table(record)
        + f"checkpoint step {results['step']}, evaluated in {results['eval_time']:.1f} s\n"
    )


def cmd_visualize(args: Any) -> str:
    """``poslab visualize RUN_DIR --out DIR``."""
    text = args.text
    if args.text_file is not None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read --text-file {args.text_file}: {error}") from None
    layers = parse_int_list(args.layers, "--layers", "0,1") if args.layers else None
    check_writable(args.out)
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
    return "".join(f"{p}\n" for p in paths)


def cmd_bench(args: Any) -> str:
    from poslab.lab.bench import run_bench  # loads the native kernels' build machinery: only when asked

    sections = split_list(args.sections)
    if args.compile and "compile" not in sections:
        sections.append("compile")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available here")
    check_writable(Path(args.out).parent)  # before minutes of measuring
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    run_bench(sections, out=args.out, quick=args.quick, device=args.device)  # prints each table
    return f"wrote {args.out}\n"


LIST = Command(
    "list",
    "list encodings, tasks and presets",
    (arg("what", nargs="?", choices=("encodings", "tasks", "presets")),),
    cmd_list,
)
RUN_COMMANDS = (
    Command(
        "train",
        "train one run",
        (
            arg("--preset", help="named configuration (poslab list presets)"),
            arg("--out", help="run directory (default runs/PRESET_ENCODING_seedN)"),
            THREADS,
            *RUN_FLAGS,
            OVERRIDES,
        ),
        cmd_train,
    ),
    Command(
        "eval",
        "evaluate a checkpoint (a file or a run directory)",
        (
            arg("checkpoint", help="checkpoint.pt or a run directory"),
            arg("--json", help="also write the results to this JSON file"),
            arg(
                "--task",
                help="score on this task instead of the training one (same tokens, e.g. a byte LM on "
                "repeated_text); its options as task.options.KEY=VALUE",
            ),
            OVERRIDES,
        ),
        cmd_eval,
    ),
)
TOOL_COMMANDS = (
    Command(
        "visualize",
        "plot DAPE's learned bias or CoPE's positions of a run",
        (
            arg(
                "run_dir", metavar="RUN_DIR", help="a trained LM run directory (config.json + checkpoint.pt)"
            ),
            arg("--out", required=True, help="directory for the PNG files"),
            arg("--kind", default="auto", choices=("auto", "dape", "cope")),
            arg("--layers", help="comma-separated layers (default all)"),
            arg("--length", type=int, help="window length in tokens (default 4L for DAPE, L for CoPE)"),
            arg("--query", type=int, default=-1, help="query position (default the last)"),
            arg(
                "--text",
                help="text to read (default: held-out text with the most sentence ends)",
                exclusive="text",
            ),
            arg("--text-file", help="read the text from this file", exclusive="text"),
            arg("--split", default="validation", choices=("train", "validation", "test")),
        ),
        cmd_visualize,
    ),
    Command(
        "bench",
        "speed and memory ratios against SDPA / the RoPE model, measured side by side in one run",
        (
            arg(
                "--sections",
                default="attention,step,decode,memory",
                help="comma-separated: attention, step, decode, memory, compile (default all but compile)",
            ),
            arg(
                "--compile",
                action="store_true",
                help="add the compile section: eager against torch.compile (inductor), side by side",
            ),
            arg("--out", default="runs/bench.json", help="JSON output (default runs/bench.json)"),
            arg("--quick", action="store_true", help="small sizes, for a first look"),
            arg("--device", default="cpu", help="cpu or cuda"),
        ),
        cmd_bench,
    ),
)
# In the order `poslab --help` lists them.
COMMANDS = (LIST, *RUN_COMMANDS, *EXPERIMENT_COMMANDS, *STUDY_COMMANDS, *TOOL_COMMANDS)


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poslab",
        description="Position encodings for transformers: train, evaluate and compare them.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, aliases=command.aliases)
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for a in command.args:
            if a.exclusive is not None and a.exclusive not in groups:
                groups[a.exclusive] = p.add_mutually_exclusive_group()
            target = p if a.exclusive is None else groups[a.exclusive]
            target.add_argument(*a.names, **a.settings)
        p.set_defaults(run=command.run)
    return parser


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
    previous = _sigterm_as_interrupt()
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be at least 1, got {threads}")
            cores = _cores()
            if threads > cores:
                logging.getLogger("poslab").warning(
                    "--threads %d is more than the %d core(s) this process may use; threads beyond "
                    "the cores contend with each other and slow the work down",
                    threads,
                    cores,
                )
            torch.set_num_threads(threads)
        print(args.run(args), end="")
        return 0
    except ValueError as error:
        print(f"poslab: error: {_advice(_one_line(error), args)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"poslab: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a write outside the atomic helpers: a log line, a plot, a directory
        message = _one_line(output_error(error.filename or "a file", error))
        print(f"poslab: error: {_advice(message, args)}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the allocator, past what `poslab.lab.memory.check_fits` could foresee
        if not _out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0][:160]
        print(
            f"poslab: error: out of memory ({first}); lower train.batch_size, eval.batch_size, the "
            "lengths or the model size",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        advice = (
            "; continue a run with --resume"
            if hasattr(args, "resume")
            else "; run the command again to continue"
            if hasattr(args, "no_resume")  # lm-extrapolation reuses what is done by default
            else ""
        )
        print(f"poslab: interrupted{advice}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (``kill PID``) stops any command as Ctrl-C does (exit 130, files whole), also between
    a grid's runs; a run in training saves a checkpoint first (`poslab.lab.train`). Returns the
    previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


# Advice in the library's messages that names a flag, and what it becomes for a command without it.
_WITHOUT_OVERWRITE = (
    ("; pass --resume to continue it or --overwrite to replace it", "; use another --out"),
    ("; use another --out or --overwrite", "; use another --out"),
    (", or --overwrite to train it again", ", or remove it to train it again"),
)
_WITHOUT_RESUME = ((" (--resume continues a run)", ""),)


def _advice(message: str, args: Any) -> str:
    """``message`` without advice to pass a flag the command does not have (``report`` on a full
    disk said "--resume continues a run"; ``lm-extrapolation`` said "use --overwrite")."""
    if not hasattr(args, "overwrite"):
        for old, new in _WITHOUT_OVERWRITE:
            message = message.replace(old, new)
    if not hasattr(args, "resume"):
        for old, new in _WITHOUT_RESUME:
            message = message.replace(old, new)
    return message


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _out_of_memory(error: RuntimeError) -> bool:
    text = str(error)
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "can't allocate memory" in text
        or "out of memory" in text
    )


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
