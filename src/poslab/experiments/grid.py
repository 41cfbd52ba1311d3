"""Grids of runs: every (encoding, seed) of a base config, planned, checked and trained.

A grid puts run ``(spec, seed)`` at ``root/<slug(spec)>/seed<seed>`` (`poslab.config.slug`). Every
directory is checked before anything trains; finished runs are reused when resuming, and the rest
train one after the other or in worker processes (``jobs``) that share the CPU cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from poslab.config import RunConfig, encoding_label, slug
from poslab.progress import setup_logging
from poslab.runs import RunDir
from poslab.runtime import tune_allocator
from poslab.train import train

log = logging.getLogger("poslab")


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its config and its directory."""

    config: RunConfig
    run_dir: RunDir

    @property
    def path(self) -> Path:
        return self.run_dir.path


def plan_grid(
    base: RunConfig,
    encodings: Sequence[str],
    seeds: Sequence[int],
    root: str | Path,
    *,
    resume: bool,
    overwrite: bool,
) -> list[GridRun]:
    """One run per encoding and seed at ``root/<encoding>/seed<k>``, every directory checked
    (`RunDir.check`) before anything trains; ValueError when two encodings share a directory."""
    grid = []
    for spec in encodings:
        for seed in seeds:
            config = base.override({"model.encoding": spec, "train.seed": seed})
            run_dir = RunDir(Path(root) / slug(encoding_label(spec)) / f"seed{seed}")
            run_dir.check(resume=resume, overwrite=overwrite, config=config)
            grid.append(GridRun(config, run_dir))
    if len({run.run_dir for run in grid}) < len(grid):
        raise ValueError("two encodings of --encodings map to the same directory; list each once")
    return grid


def estimated_cost(config: RunConfig) -> float:
    """A run's relative training cost, to start the slowest first: tokens trained on, times a
    factor for encodings that rewrite the logits (CoPE, DAPE: several times NoPE's step on a CPU)
    or add a bias. Only the order matters. A task that draws each batch's length from a range (the
    Chomsky tasks, no ``task.train_len``) counts the tokens of a sequence at its longest length."""
    tc = config.train
    encoding = config.model.to_model_config(vocab_size=1, n_outputs=None, causal=True).build_encoding()
    factor = 4.0 if encoding.uses_logits else 1.5 if "bias" in encoding.hooks else 1.0
    length = config.task.train_len
    if length is None:
        task = config.task.build()
        longest = task.split_lengths("id")[-1]
        length = task.sample(1, longest, generator=torch.Generator().manual_seed(0)).inputs.shape[1]
    return tc.steps * tc.batch_size * length * config.model.d_model * factor


def check_jobs(jobs: int, threads: int | None = None) -> None:
    """ValueError for ``--jobs`` or ``--threads`` below 1."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")


def train_grid(
    grid: list[GridRun],
    *,
    resume: bool,
    overwrite: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool | None = None,
) -> list[GridRun]:
    """Train the runs of ``grid`` that are not finished (all of them unless ``resume``), ``jobs``
    at a time, the slowest first (`estimated_cost`: with several workers, a slow run started last
    would leave the others idle); logs ``run 3/6 ...`` with an estimate of the time left. Worker
    processes get ``threads`` threads each (default: the cores shared between them). Returns the
    runs trained; a failed run stops the grid."""
    check_jobs(jobs, threads)
    todo = [run for run in grid if not (resume and run.run_dir.status() == "finished")]
    if len(todo) < len(grid):
        log.info("%d of %d runs already finished; resuming the rest", len(grid) - len(todo), len(grid))
    todo.sort(key=lambda run: -estimated_cost(run.config))  # stable: grid order among equals
    jobs = max(1, min(jobs, len(todo))) if todo else 1
    tracker = _GridProgress(todo, jobs)
    if jobs == 1:
        for run in todo:
            tracker.starting(run)
            train(run.config, run.path, resume=resume, overwrite=overwrite, progress=progress)
            tracker.finished(run)
    else:
        _train_parallel(todo, jobs, threads, tracker, resume=resume, overwrite=overwrite)
    return todo


class _GridProgress:
    """Logs a grid's progress: which run starts (``run 3/6``), which finished, and the time left,
    estimated from the runs done so far weighted by `estimated_cost`."""

    def __init__(self, todo: list[GridRun], jobs: int) -> None:
        self.total, self.jobs = len(todo), jobs
        self.costs = {run.path: estimated_cost(run.config) for run in todo}
        self.started = self.finished_runs = 0
        self.done_cost, self.left_cost = 0.0, sum(self.costs.values())
        self.clock = time.monotonic()

    def _eta(self) -> str:
        if not self.done_cost:
            return ""
        elapsed = time.monotonic() - self.clock
        left = elapsed / self.done_cost * self.left_cost / self.jobs
        return f"; about {_clock(left)} left"

    def starting(self, run: GridRun) -> None:
        self.started += 1
        label = encoding_label(run.config.model.encoding, run.config.model.encoding_options)
        log.info(
            "run %d/%d: %s seed %d%s", self.started, self.total, label, run.config.train.seed, self._eta()
        )

    def finished(self, run: GridRun) -> None:
        cost = self.costs[run.path]
        self.done_cost, self.left_cost = self.done_cost + cost, self.left_cost - cost
        self.finished_runs += 1
        log.info("finished %d/%d runs (%s)%s", self.finished_runs, self.total, run.path, self._eta())


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _train_parallel(
    todo: list[GridRun],
    jobs: int,
    threads: int | None,
    tracker: _GridProgress,
    *,
    resume: bool,
    overwrite: bool,
) -> None:
    """Train runs in ``jobs`` worker processes, splitting the CPU threads between them unless
    ``threads`` is given."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    quiet = log.level > logging.INFO
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(threads, quiet)
    ) as pool:
        # The pool starts them in this order, the slowest first, ``jobs`` at a time.
        futures = {
            pool.submit(_train_worker, run.config.to_dict(), str(run.path), resume, overwrite): run
            for run in todo
        }
        for run in todo[:jobs]:
            tracker.starting(run)
        waiting = list(todo[jobs:])
        try:
            with _stop_workers_on_sigterm(pool):
                for future in as_completed(futures):
                    future.result()
                    tracker.finished(futures[future])
                    if waiting:
                        tracker.starting(waiting.pop(0))
        except BaseException:  # a failed run stops the grid: runs not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            raise


@contextmanager
def _stop_workers_on_sigterm(pool: ProcessPoolExecutor) -> Iterator[None]:
    """Within the block, SIGTERM to the grid's process (``kill PID``) is passed on to the workers,
    which save a checkpoint after their current step and stop (`poslab.train`), and stops the grid
    as Ctrl-C does; without it the workers would train on, orphaned, after the grid had gone. (Ctrl-C
    in a terminal reaches the workers by itself: they share the terminal's process group.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: object) -> None:
        workers = getattr(pool, "_processes", None) or {}  # pid -> Process, while the pool runs
        for pid in list(workers):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_init(threads: int, quiet: bool) -> None:
    tune_allocator()  # process-wide: only in grid workers and the command line
    torch.set_num_threads(threads)
    setup_logging(quiet)


def _train_worker(config: dict, run_dir: str, resume: bool, overwrite: bool) -> None:
    train(RunConfig.from_dict(config), run_dir, resume=resume, overwrite=overwrite, progress=False)
