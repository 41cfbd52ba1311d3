"""Grids of runs: every (encoding, seed) of a base config, planned, checked and trained.

A grid puts run ``(spec, seed)`` at ``root/<slug(spec)>/seed<seed>`` (`poslab.config.slug`). Every
directory is checked before anything trains; finished runs are reused when resuming, and the rest
train one after the other or in worker processes (``jobs``) that share the CPU cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
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


def train_grid(
    grid: list[GridRun],
    *,
    resume: bool,
    overwrite: bool = False,
    jobs: int = 1,
    progress: bool | None = None,
) -> list[GridRun]:
    """Train the runs of ``grid`` that are not finished (all of them unless ``resume``), ``jobs``
    at a time; returns the runs trained. A failed run stops the grid."""
    todo = [run for run in grid if not (resume and run.run_dir.status() == "finished")]
    if len(todo) < len(grid):
        log.info("%d of %d runs already finished; resuming the rest", len(grid) - len(todo), len(grid))
    jobs = max(1, min(jobs, len(todo))) if todo else 1
    if jobs == 1:
        for run in todo:
            train(run.config, run.path, resume=resume, overwrite=overwrite, progress=progress)
    else:
        _train_parallel(todo, jobs, resume=resume, overwrite=overwrite)
    return todo


def _train_parallel(todo: list[GridRun], jobs: int, *, resume: bool, overwrite: bool) -> None:
    """Train runs in ``jobs`` worker processes, splitting the CPU threads between them."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    quiet = log.level > logging.INFO
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(threads, quiet)
    ) as pool:
        futures = [
            pool.submit(_train_worker, run.config.to_dict(), str(run.path), resume, overwrite) for run in todo
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a failed run stops the grid: runs not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_init(threads: int, quiet: bool) -> None:
    tune_allocator()  # process-wide: only in grid workers and the command line
    torch.set_num_threads(threads)
    setup_logging(quiet)


def _train_worker(config: dict, run_dir: str, resume: bool, overwrite: bool) -> None:
    train(RunConfig.from_dict(config), run_dir, resume=resume, overwrite=overwrite, progress=False)
