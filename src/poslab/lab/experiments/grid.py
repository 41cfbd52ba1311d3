"""Grids of runs: every (encoding, seed) of a base config, planned, checked and trained.

A grid puts run ``(spec, seed)`` at ``root/<slug(spec)>/seed<seed>`` (`poslab.lab.config.slug`). Every
directory is checked before anything trains; finished runs are reused when resuming, and the rest
train one after the other or in worker processes (``jobs``) that share the CPU cores.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poslab.allocator import tune_allocator
from poslab.lab.config import RunConfig, encoding_label, slug
from poslab.lab.progress import setup_logging
from poslab.lab.rundir import METRICS, RunDir
from poslab.lab.train import train

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
    read_only: bool = False,
) -> list[GridRun]:
    """One run per encoding and seed at ``root/<encoding>/seed<k>``, every directory checked
    (`RunDir.check`) before anything trains; ValueError when two encodings share a directory.
    ``read_only``: the grid is only read (a page), so runs another process is writing are allowed."""
    grid = []
    for spec in encodings:
        for seed in seeds:
            config = base.override({"model.encoding": spec, "train.seed": seed})
            run_dir = RunDir(Path(root) / slug(encoding_label(spec)) / f"seed{seed}")
            run_dir.check(resume=resume, overwrite=overwrite, config=config, read_only=read_only)
            if resume:
                run_dir.check_reusable(config)  # a finished run is reused only for its own config
            grid.append(GridRun(config, run_dir))
    if len({run.run_dir for run in grid}) < len(grid):
        raise ValueError("two encodings of --encodings map to the same directory; list each once")
    return grid


def estimated_cost(config: RunConfig) -> float:
    """A run's relative training cost, to plan the order runs start in: tokens trained on, times a
    factor for encodings that rewrite the logits (CoPE, DAPE) or add a bias (ALiBi, Kerple, ...).
    The factors are measured steps of the native kernels on a CPU, against RoPE's: CoPE 1.5 and DAPE
    1.65 on the flip-flop demo (its wall times), 1.2-1.5 at length 512 (`poslab bench`); a bias 1.3.
    A task that draws each batch's length from a range (the Chomsky tasks, no ``task.train_len``)
    counts the tokens of a sequence at its longest length."""
    tc = config.train
    model = config.model.to_model_config(vocab_size=1, n_outputs=None, causal=True)
    factor = max(
        1.6 if encoding.uses_logits else 1.3 if "bias" in encoding.hooks else 1.0
        for encoding in model.distinct_encodings()
    )
    length = config.task.train_len
    if length is None:
        task = config.task.build()
        longest = task.split_lengths("id")[-1]
        length = task.sample(1, longest, generator=torch.Generator().manual_seed(0)).inputs.shape[1]
    return tc.steps * tc.batch_size * length * config.model.d_model * factor


def makespan(costs: Sequence[float], jobs: int) -> float:
    """When the last of ``costs`` would finish if ``jobs`` workers took them in this order, each
    worker taking the next as soon as it is free (what a process pool does)."""
    free = [0.0] * jobs
    for cost in costs:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


def start_order(costs: Sequence[float], jobs: int, *, search_up_to: int = 8) -> list[int]:
    """The order to start runs of these ``costs`` in on ``jobs`` workers: the slowest first (a slow
    run started last leaves the other workers idle), and for small grids (up to ``search_up_to``
    runs) the order of least `makespan`, found by trying them all (ties go to the slowest-first
    order). Slowest first is not always best: five runs of costs 1.65, 1.55, 1.27, 1, 1 on two
    workers end at 3.65 that way, at 3.27 in the order 1.65, 1.27, 1, 1.55, 1."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])  # stable: grid order among equals
    if jobs < 2 or len(order) <= jobs or len(order) > search_up_to:
        return order
    best, best_span = order, makespan([costs[i] for i in order], jobs)
    for candidate in itertools.permutations(order):
        span = makespan([costs[i] for i in candidate], jobs)
        if span < best_span * (1 - 1e-9):
            best, best_span = list(candidate), span
    return best


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
    at a time, in the order of `start_order` (the slowest first, or for a small grid the order that
    should end soonest, from `estimated_cost`); logs ``run 3/6 ...`` with an estimate of the time left. Worker
    processes get ``threads`` threads each (default: the cores shared between them). Returns the
    runs trained. A failed run stops the grid: runs training beside it finish, no other starts."""
    check_jobs(jobs, threads)
    todo = [run for run in grid if not (resume and run.run_dir.status() == "finished")]
    if len(todo) < len(grid):
        log.info("%d of %d runs already finished; resuming the rest", len(grid) - len(todo), len(grid))
    jobs = max(1, min(jobs, len(todo))) if todo else 1
    todo = [todo[i] for i in start_order([estimated_cost(run.config) for run in todo], jobs)]
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
    """Logs a grid's progress: which run starts (``run 3/6``), which finished, and the time left.

    The time left comes from the runs finished so far: their wall time per unit of `estimated_cost`
    (one worker's speed) times the work left, queued and in flight, shared by the ``jobs`` workers,
    and never less than the longest run still to end. A resumed run counts only the steps it has
    left (from its metrics log), so a run resumed near its end does not make the grid look fast."""

    def __init__(self, todo: list[GridRun], jobs: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.jobs, self.clock = len(todo), jobs, clock
        self.costs = {run.path: estimated_cost(run.config) * _fraction_left(run) for run in todo}
        self.queued = dict(self.costs)  # runs not started yet
        self.running: dict[Path, float] = {}  # run -> when it started
        self.done_cost = self.done_seconds = 0.0

    def _eta(self) -> str:
        if not self.done_cost:
            return ""
        per_cost = self.done_seconds / self.done_cost  # one worker's seconds per unit of cost
        now = self.clock()
        in_flight = [max(0.0, self.costs[path] * per_cost - (now - t)) for path, t in self.running.items()]
        queued = [cost * per_cost for cost in self.queued.values()]
        left = max((sum(in_flight) + sum(queued)) / self.jobs, *in_flight, *queued, 0.0)
        return f"; about {_clock(left)} left"

    def starting(self, run: GridRun) -> None:
        self.queued.pop(run.path, None)
        self.running[run.path] = self.clock()
        started = self.total - len(self.queued)
        label = encoding_label(run.config.model.encoding, run.config.model.encoding_options)
        log.info("run %d/%d: %s seed %d%s", started, self.total, label, run.config.train.seed, self._eta())

    def finished(self, run: GridRun) -> None:
        started = self.running.pop(run.path, self.clock())
        self.done_cost += self.costs[run.path]
        self.done_seconds += self.clock() - started
        finished = self.total - len(self.queued) - len(self.running)
        log.info("finished %d/%d runs (%s)%s", finished, self.total, run.path, self._eta())


def _fraction_left(run: GridRun) -> float:
    """The share of ``run``'s steps still to train: 1 for a new run, less for one resumed from a
    checkpoint (its last logged step, read from metrics.jsonl), at least 5% (its final evaluation)."""
    steps = run.config.train.steps
    if not run.run_dir.has_checkpoint() or steps <= 0:
        return 1.0
    done = 0
    try:
        with (run.run_dir / METRICS).open() as f:
            for line in f:
                try:
                    done = max(done, int(json.loads(line).get("step", 0)))
                except (ValueError, TypeError, AttributeError):
                    continue  # a torn last line: the estimate only needs the steps before it
    except OSError:
        return 1.0
    return max(0.05, 1.0 - min(done, steps) / steps)


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
    stop = context.Event()  # once set, workers skip the runs handed to them (a run failed)
    interrupt = context.Event()  # once set, training workers also checkpoint and stop (a signal)
    signals = _GridSignals(stop, interrupt)
    with signals:
        # Workers are spawned with SIGINT and SIGTERM blocked (the mask passes to a child), so a
        # signal while one starts cannot kill it half-way; `_worker_init` ignores both and unblocks.
        with signals.blocked():
            pool = ProcessPoolExecutor(
                jobs, mp_context=context, initializer=_worker_init, initargs=(threads, quiet, stop, interrupt)
            )
            signals.pool = pool
            # The pool starts them in this order, ``jobs`` at a time (and spawns its workers here).
            futures = {
                pool.submit(_train_worker, run.config.to_dict(), str(run.path), resume, overwrite): run
                for run in todo
            }
        try:
            signals.raise_if_stopped()  # a signal that came while the pool started
            for run in todo[:jobs]:
                tracker.starting(run)
            waiting = list(todo[jobs:])
            signals.waiting = True
            for future in as_completed(futures):
                signals.waiting = False
                future.result()
                tracker.finished(futures[future])
                if waiting:
                    tracker.starting(waiting.pop(0))
                signals.raise_if_stopped()
                signals.waiting = True
            signals.waiting = False
        except BaseException:  # a failed run, Ctrl-C or SIGTERM: runs not yet started are dropped
            signals.waiting = False
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    signals.raise_if_stopped()


class _GridSignals:
    """While a parallel grid runs, SIGTERM (``kill PID``) and SIGINT (Ctrl-C, ``kill -INT``) to its process
    stop it: the first sets ``interrupt`` and ``stop`` (multiprocessing Events the workers share); a
    worker reads ``interrupt`` after every step (`poslab.lab.train.train`'s ``stop``): it saves a
    checkpoint and stops, and a worker that is idle or handed a queued run starts nothing. The grid then
    waits for its workers and exits as on Ctrl-C. A second signal kills the workers at once (their last
    checkpoints stay) so that nothing is left running. The workers themselves ignore both signals
    outside a run: a signal to the whole process group (Ctrl-C in a terminal) reaches a training worker
    as its own request to stop, and nothing else; without this an idle worker died of it and broke the
    pool, and a grid killed before its loop left its workers behind."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: Any, interrupt: Any) -> None:
        self.stop, self.interrupt = stop, interrupt
        self.count = 0
        self.waiting = False  # whether the grid waits for its runs (a signal may raise there)
        self.pool: ProcessPoolExecutor | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _GridSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    @contextmanager
    def blocked(self) -> Iterator[None]:
        if not self.previous:
            yield
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def raise_if_stopped(self) -> None:
        if self.count:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        self.interrupt.set()
        self.stop.set()
        if self.count == 1:
            log.warning(
                "interrupted: the grid's runs save a checkpoint after their step and stop "
                "(again to stop them at once)"
            )
            if self.waiting:
                self.waiting = False
                raise KeyboardInterrupt
            return
        workers = getattr(self.pool, "_processes", None) or {}  # pid -> Process, while the pool runs
        for pid in list(workers):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_STOP: Any = None  # the grid's stop Event, in a worker process: start no run
_INTERRUPT: Any = None  # the grid's interrupt Event, in a worker process: stop the run


def _worker_init(threads: int, quiet: bool, stop: Any, interrupt: Any) -> None:
    global _STOP, _INTERRUPT
    # The grid stops its workers through ``stop`` (`_GridSignals`); a run's own handlers
    # (`poslab.lab.train`) take the signals while it trains. Spawned with both blocked: ignore, unblock.
    for sig in _GridSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GridSignals.SIGNALS)
    _die_with_parent()
    tune_allocator()  # process-wide: only in grid workers and the command line
    torch.set_num_threads(threads)
    setup_logging(quiet)
    _STOP, _INTERRUPT = stop, interrupt


def _train_worker(config: dict, run_dir: str, resume: bool, overwrite: bool) -> None:
    if _STOP.is_set():  # the grid is stopping: do not start this run
        return
    try:
        train(
            RunConfig.from_dict(config),
            run_dir,
            resume=resume,
            overwrite=overwrite,
            progress=False,
            stop=_INTERRUPT.is_set,
        )
    except BaseException:
        # Stop the grid from here, before this worker takes its next run: the grid's own
        # `stop.set()` comes only after it has seen the failure, too late for that run.
        _STOP.set()
        raise


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the grid's process dies (kill -9), instead of
    leaving it waiting for runs that never come."""
    if not sys.platform.startswith("linux"):
        return
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(1)
