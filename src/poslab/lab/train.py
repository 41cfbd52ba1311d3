"""The training loop: AdamW with warmup and cosine decay, clipping, periodic evaluation, atomic
checkpoints that resume to the same result, and data-parallel training under ``torchrun``.

A run writes the files of its `poslab.lab.rundir.RunDir` (config.json first, results.json last).

Determinism: the model is initialised from ``train.seed``, the training batches come from one
``torch.Generator`` seeded with it, and the learning rate is a function of the step, so a run
interrupted after a checkpoint and resumed ends with the same parameters and metrics as an
uninterrupted one (bit for bit on CPU).

Data parallel: launched with ``torchrun --nproc_per_node N -m poslab train ...``, every process
draws the same global batch and trains on its 1/N slice; DDP averages the gradients (gloo on CPU,
nccl on GPU). Process 0 writes the files and evaluates.

The loop reads top to bottom: `train` sets up the process group, `_train` the run directory,
`_start` builds (or restores) the `TrainState`, `_update` is one optimizer step and `_after_update`
its logging, evaluation and checkpoint; `_finish` writes results.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from poslab.lab.checkpoint import check_writable, json_safe, save_checkpoint, write_text
from poslab.lab.config import RunConfig, TrainConfig
from poslab.lab.evaluate import evaluate, format_metrics, planned_lengths
from poslab.lab.memory import check_fits
from poslab.lab.progress import Progress
from poslab.lab.provenance import code_commit, machine_record
from poslab.lab.rundir import CHECKPOINT, LOG, METRICS, RunDir, load_model_state, results_record
from poslab.model import Transformer, build_model, masked_cross_entropy

log = logging.getLogger("poslab")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm; the run stopped."""


@dataclass
class TrainResult:
    """What `train` returns. ``results`` is the content of results.json."""

    config: RunConfig
    model: Transformer
    results: dict[str, Any]
    run_dir: Path | None

    @property
    def metrics(self) -> dict[str, Any]:
        """The final evaluation: ``{"splits": ..., "lengths": ...}``."""
        return self.results["metrics"]


# -- pieces of the loop ----------------------------------------------------------------------------


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update ``step`` (from 0): linear warmup, cosine decay to lr*min_lr_ratio."""
    warmup = min(config.warmup, config.steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(config.steps - warmup, 1), 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embedding tables (dim >= 2), not on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def keep_first_halves(optimizer: torch.optim.Optimizer) -> None:
    """Cut the optimizer moments of a decoder's two-half parameters to their first half, as loading
    cuts the weights: a decoder checkpointed before decoders dropped the encoder half (CoPE's and
    relative PE's second table half, Kerple's row 1) saved moments of twice the parameter's size. The
    first half of the flattened moment is the first rows (tables) or row 0 (Kerple's (2, H)); the
    dropped half was never updated (zero gradient), so the run continues exactly as it would have."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in list(state.items()):
                halve = torch.is_tensor(value) and value.dim() and value.shape != param.shape
                if halve and value.numel() == 2 * param.numel():
                    state[name] = value.reshape(2, -1)[0].reshape(param.shape).clone()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; ValueError for CUDA requested but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name} but CUDA is not available here")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


class BatchStream:
    """Training batches of a task, from one generator (its state is part of a checkpoint).

    Tasks whose "id" split is a length range (Chomsky) get one uniform length per batch;
    with ``train_pool`` the batches are rows drawn with replacement from a fixed training set.
    """

    def __init__(self, task, config: RunConfig, generator: torch.Generator) -> None:
        self.task, self.config, self.generator = task, config, generator
        self.split = task.splits()["id"]
        self.lengths = task.split_lengths("id")
        self.pool = None
        if config.task.train_pool:
            self.pool = task.sample(
                config.task.train_pool, config.task.train_len, generator=generator, **self.split
            )

    def next(self):
        size = self.config.train.batch_size
        if self.pool is not None:
            rows = torch.randint(0, self.config.task.train_pool, (size,), generator=self.generator)
            return type(self.pool)(self.pool.inputs[rows], self.pool.targets[rows], self.pool.mask[rows])
        if self.lengths is not None:
            lengths = self.lengths
            length = lengths[int(torch.randint(0, len(lengths), (1,), generator=self.generator))]
        else:
            length = self.config.task.train_len
        return self.task.sample(size, length, generator=self.generator, **self.split)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    owns = not dist.is_initialized()
    if owns:
        wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


class _MetricsLog:
    """Appends JSON records to metrics.jsonl (process 0 only; a no-op without a run dir)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(json_safe(record)) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by an interrupted run after its last checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
        write_text(self.path, "".join(line + "\n" for line in kept))


# -- the loop --------------------------------------------------------------------------------------


def train(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train one run and evaluate it.

    Args:
        config: the run.
        out_dir: the run directory (created if needed); None trains without writing files.
        resume: continue from ``out_dir``'s checkpoint (a fresh start when it has none). The
            config must equal the saved one except for `rundir.RESUMABLE_CHANGES` (e.g. more steps).
        overwrite: replace a run already in ``out_dir``.
        progress: draw a progress bar; None draws one only when stderr is a terminal.
        callback: called as ``callback(step, model)`` after every update (and its checkpoint).
        stop: asked after every update; once it returns True the run saves a checkpoint and stops
            with KeyboardInterrupt, as on Ctrl-C (a grid's workers are stopped this way).

    Raises:
        RunDirError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        NonFiniteLossError: the loss or gradient norm became NaN or infinite; the last good
            checkpoint is left as it was.
        CheckpointError: the checkpoint to resume from cannot be read.
    """
    ctx = _init_distributed(config.train.device)
    try:
        return _train(config, out_dir, ctx, resume, overwrite, progress, callback, stop)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(
    config: RunConfig,
    out_dir: str | Path | None,
    ctx: _Dist,
    resume: bool,
    overwrite: bool,
    progress: bool | None,
    callback: Callable[[int, nn.Module], None] | None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    tc = config.train
    if tc.batch_size % ctx.world:
        raise ValueError(
            f"train.batch_size ({tc.batch_size}) must be divisible by the number of processes ({ctx.world})"
        )
    device = resolve_device(tc.device, ctx.local_rank)
    run_dir = RunDir(out_dir) if out_dir is not None else None
    # Everything that can be checked is, before the run directory is touched: the directory and
    # its checkpoint (every process), the data (an empty corpus), the sizes against free memory,
    # the evaluation lengths, and that the directory can be written.
    checkpoint = None
    replacing = None  # an overwritten run, set aside until the new one has saved a checkpoint
    status = "empty"
    if run_dir is not None:
        status = run_dir.check(resume=resume, overwrite=overwrite, config=config)
        if resume and run_dir.has_checkpoint():
            checkpoint = run_dir.load_checkpoint()
    task = config.task.build()
    check_fits(config, task, device, eval_lengths=planned_lengths(task, config.eval, config.task.train_len))
    _check_positions(config, task)
    locked = None  # the run directory, while this process holds its lock
    try:
        if run_dir is not None:
            ctx.barrier()
            if ctx.main:
                check_writable(run_dir.path)
                run_dir.path.mkdir(parents=True, exist_ok=True)
                run_dir.lock()  # RunDirError while another live process writes it
                locked = run_dir
                # Checked again under the lock: another process may have written it meanwhile.
                status = run_dir.check(resume=resume, overwrite=overwrite, config=config)
                for stale in run_dir.remove_stale_temporaries():
                    log.info("removed %s, left by a process that was killed while writing it", stale)
                if overwrite and status != "empty":
                    replacing = _Replacing(run_dir)
                elif overwrite or (resume and checkpoint is None):
                    run_dir.clear()
                run_dir.write_config(config)
        writer = run_dir if ctx.main else None
        try:
            file_log = _attach_file_log(writer / LOG if writer is not None else None)
            try:
                session = _Session(
                    config=config,
                    run_dir=run_dir,
                    writer=writer,
                    ctx=ctx,
                    device=device,
                    task=task,
                    metrics_log=_MetricsLog(writer / METRICS if writer is not None else None),
                    replacing=replacing,
                )
                return _loop(session, checkpoint, progress, callback, stop)
            finally:
                _detach_file_log(file_log)
        except BaseException:
            if replacing is not None:
                replacing.undo()
            raise
    finally:
        if locked is not None:
            locked.unlock()


def _check_positions(config: RunConfig, task: Any) -> None:
    """ValueError when the encoding cannot run at a fixed evaluation length (a learned table shorter
    than the sequences): every metric of that split would be null after the whole training.
    Length-range splits (Chomsky) may run past it: those lengths are scored NaN by design."""
    encodings = config.model_config(task).distinct_encodings()
    splits = task.splits()
    names = list(config.eval.splits) if config.eval.splits is not None else list(splits)
    for name in names:
        if task.split_lengths(name) is not None:
            continue
        length = config.eval.length or config.task.train_len
        tokens = task.sample(1, length, generator=torch.Generator().manual_seed(0), **splits[name]).inputs
        try:
            for encoding in encodings:
                encoding.check_length(tokens.shape[1] - 1)
        except ValueError as error:
            given = f"eval.length={length}" if config.eval.length else f"task.train_len={length}"
            raise ValueError(
                f"{given} gives {tokens.shape[1]} tokens in split {name}, past what the encoding "
                f"covers ({error}); every metric would be null: raise model.max_len or lower it"
            ) from None


class _Replacing:
    """An overwritten run's files, set aside (`RunDir.set_aside`) until the new run saves its first
    checkpoint: a new run that fails before that leaves the old one as it was."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.pending = True
        run_dir.set_aside()

    def done(self) -> None:
        if self.pending:
            self.run_dir.drop_aside()
            self.pending = False

    def undo(self) -> None:
        if self.pending:
            self.run_dir.restore()
            self.pending = False


@dataclass(frozen=True)
class _Session:
    """What stays fixed while a run trains: its config and task, where it writes, on what it runs."""

    config: RunConfig
    run_dir: RunDir | None
    writer: RunDir | None  # the run directory on the process that writes it (process 0), else None
    ctx: _Dist
    device: torch.device
    task: Any  # a poslab.lab.tasks.Task
    metrics_log: _MetricsLog
    replacing: _Replacing | None = None
    # The commit when the run starts, not when it ends: a checkout changed while it trains does not
    # change the code it runs.
    commit: str = field(default_factory=lambda: code_commit())

    def save(self, state: TrainState, elapsed: float) -> None:
        """Save the checkpoint (process 0); the first one replaces an overwritten run."""
        if self.writer is not None:
            save_checkpoint(self.writer / CHECKPOINT, state.checkpoint(self, elapsed))
            if self.replacing is not None:
                self.replacing.done()

    @property
    def label(self) -> str:
        return f"{self.config.task.name} {self.config.encoding_label} seed {self.config.train.seed}"


@dataclass
class TrainState:
    """Everything a training step changes, and what a checkpoint saves: the model, the optimizer,
    the training-data generator, the step, the time spent before this process started, and the
    last evaluation; plus the running loss since the last log record."""

    model: Transformer
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    batches: BatchStream
    step: int = 0
    elapsed_before: float = 0.0
    last_eval: dict[str, Any] | None = None
    loss_sum: float = 0.0
    loss_count: int = 0

    def checkpoint(self, session: _Session, elapsed: float) -> dict[str, Any]:
        """The checkpoint state (see `poslab.lab.checkpoint.REQUIRED`)."""
        device = session.device
        return {
            "step": self.step,
            "config": session.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "elapsed": elapsed,
            "eval": self.last_eval,
        }

    def restore(self, checkpoint: dict[str, Any], session: _Session) -> None:
        """Continue from ``checkpoint``: weights, optimizer, data generator, RNGs and step."""
        load_model_state(self.model, checkpoint, session.run_dir / CHECKPOINT)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        keep_first_halves(self.optimizer)
        self.generator.set_state(checkpoint["data_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if session.device.type == "cuda" and checkpoint.get("cuda_rng"):
            torch.cuda.set_rng_state(checkpoint["cuda_rng"][0], session.device)
        self.step = int(checkpoint["step"])
        self.elapsed_before = float(checkpoint.get("elapsed", 0.0))
        self.last_eval = checkpoint.get("eval")


def _start(session: _Session, checkpoint: dict[str, Any] | None) -> TrainState:
    """A fresh `TrainState` seeded from ``train.seed``, or the one ``checkpoint`` saved."""
    config, tc = session.config, session.config.train
    seed_everything(tc.seed)
    model = build_model(config.model_config(session.task)).to(session.device)
    optimizer = build_optimizer(model, tc)
    generator = torch.Generator().manual_seed(tc.seed)
    state = TrainState(model, optimizer, generator, BatchStream(session.task, config, generator))
    if checkpoint is not None:
        state.restore(checkpoint, session)
        session.metrics_log.truncate_after(state.step)
        if session.ctx.main:
            log.info("resumed %s at step %d", session.run_dir, state.step)
    return state


def _wrap_parallel(session: _Session, model: Transformer) -> nn.Module:
    """The module the steps call: the model itself, or its DDP wrapper under ``torchrun``."""
    if session.ctx.world == 1:
        return model
    device = session.device
    ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
    unused = _has_unused_parameters(model, session.task, device)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused, **ddp_args)


def _loop(
    session: _Session,
    checkpoint: dict[str, Any] | None,
    progress: bool | None,
    callback: Callable[[int, nn.Module], None] | None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    ctx, tc = session.ctx, session.config.train
    state = _start(session, checkpoint)
    n_params = sum(p.numel() for p in state.model.parameters())
    if ctx.main:
        log.info(
            "%s: %d parameters, %d steps, batch %d, on %s%s%s",
            session.label,
            n_params,
            tc.steps,
            tc.batch_size,
            session.device,
            f" x {ctx.world} processes" if ctx.world > 1 else "",
            f" -> {session.run_dir}" if session.run_dir is not None else "",
        )
    net = _wrap_parallel(session, state.model)
    rows = slice(ctx.rank * tc.batch_size // ctx.world, (ctx.rank + 1) * tc.batch_size // ctx.world)
    clock = _PausableClock()
    enabled = progress if ctx.main else False
    bar = Progress(tc.steps, desc=session.label, initial=state.step, enabled=enabled)
    final_eval_done = False
    try:
        state.model.train()
        with _Interrupts() as interrupts, clock:
            while state.step < tc.steps:
                lr, grad_norm = _update(session, state, net, rows)
                bar.update(1, loss=state.loss_sum / state.loss_count)  # mean since the last log record
                elapsed = state.elapsed_before + clock.seconds()
                final_eval_done = _after_update(session, state, lr, grad_norm, elapsed, bar.enabled)
                if callback is not None:
                    callback(state.step, state.model)
                if interrupts.requested or (stop is not None and stop()):
                    session.save(state, elapsed)
                    where = f"; checkpoint saved in {session.run_dir}" if session.writer is not None else ""
                    log.warning("%s: stopped at step %d%s", session.label, state.step, where)
                    raise KeyboardInterrupt
    finally:
        bar.close()
    if not final_eval_done:  # resumed at or past the last step: evaluate what was loaded
        state.last_eval = _evaluate(session, state)
    return _finish(session, state, n_params, state.elapsed_before + clock.seconds())


class _Interrupts:
    """While training: the first Ctrl-C (SIGINT) or SIGTERM (``kill``, a grid stopping its workers)
    asks the loop to stop after the step it lands in, with a checkpoint; a second one stops at once.
    A handler, rather than KeyboardInterrupt raised wherever Python happens to be, so that an
    optimizer step is never left half done and the request cannot be lost inside torch's native
    code. Only the main thread can install it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)")


class _PausableClock:
    """Seconds since it was made, less the time the process spent stopped by SIGTSTP (Ctrl-Z in a
    terminal, ``kill -TSTP PID``) while it was entered: a run's recorded wall time is its training
    time, not the time a user (or a benchmark wanting quiet cores) kept it paused. On SIGTSTP the
    handler stops the process itself (SIGSTOP) and, once continued (``fg``, ``kill -CONT PID``),
    counts how long that took. SIGSTOP, which no process can catch, still pauses a run, counted.
    Only the main thread can install the handler; elsewhere the clock counts every second."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stopped = 0.0
        self.previous: Any = None

    def seconds(self) -> float:
        return time.monotonic() - self.started - self.stopped

    def __enter__(self) -> _PausableClock:
        if hasattr(signal, "SIGTSTP") and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTSTP, self._stop)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTSTP, self.previous)
            self.previous = None

    def _stop(self, signum: int, frame: Any) -> None:
        began = time.monotonic()
        os.kill(os.getpid(), signal.SIGSTOP)  # delivered before kill returns: this line waits for SIGCONT
        self.stopped += time.monotonic() - began


def _update(session: _Session, state: TrainState, net: nn.Module, rows: slice) -> tuple[float, float]:
    """One optimizer step on this process's rows of the next batch; returns (lr, gradient norm).

    Raises `NonFiniteLossError` before the step when the loss or the gradient norm is not finite.
    """
    tc, ctx, device = session.config.train, session.ctx, session.device
    lr = lr_at(state.step, tc)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    batch = state.batches.next()
    inputs, targets, mask = (t[rows].to(device) for t in (batch.inputs, batch.targets, batch.mask))
    logits = net(inputs)
    loss = masked_cross_entropy(logits, targets, mask if tc.loss == "scored" else None)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = float(nn.utils.clip_grad_norm_(state.model.parameters(), max_norm))
    loss_value = loss.detach()
    if ctx.world > 1:
        dist.all_reduce(loss_value)
        loss_value /= ctx.world
    loss_value = float(loss_value)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        run_dir = session.run_dir
        where = (
            f"; the last good checkpoint is {run_dir / CHECKPOINT}"
            if run_dir is not None and run_dir.has_checkpoint()
            else ""
        )
        raise NonFiniteLossError(
            f"non-finite {what} ({loss_value if what == 'loss' else grad_norm}) at step "
            f"{state.step + 1}; training stopped{where}. Try a lower train.lr or train.grad_clip"
        )
    state.optimizer.step()
    state.step += 1
    state.loss_sum, state.loss_count = state.loss_sum + loss_value, state.loss_count + 1
    return lr, grad_norm


def _after_update(
    session: _Session, state: TrainState, lr: float, grad_norm: float, elapsed: float, bar_shown: bool
) -> bool:
    """Log, evaluate and checkpoint on their schedules after an update; returns whether this was
    the final evaluation (at the last step)."""
    tc, step = session.config.train, state.step
    milestone = max(1, tc.steps // 10)  # without a progress bar, log progress ten times a run
    if session.ctx.main and not bar_shown and step % milestone == 0 and step < tc.steps:
        mean_loss = state.loss_sum / state.loss_count
        log.info("%s: step %d/%d, loss %.4f, %.0f s", session.label, step, tc.steps, mean_loss, elapsed)
    if tc.log_every and step % tc.log_every == 0:
        record = {"step": step, "kind": "train", "loss": state.loss_sum / state.loss_count}
        session.metrics_log.write({**record, "lr": lr, "grad_norm": grad_norm, "elapsed": elapsed})
        state.loss_sum, state.loss_count = 0.0, 0
    # The checkpoint first: an evaluation that fails (or is interrupted) loses no training.
    if step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
        session.save(state, elapsed)
    final = False
    if step == tc.steps or (tc.eval_every and step % tc.eval_every == 0):
        state.last_eval = _evaluate(session, state)
        final = step == tc.steps
    return final


def _evaluate(session: _Session, state: TrainState) -> dict[str, Any] | None:
    """Evaluate on process 0 (logged to metrics.jsonl); every process waits for it."""
    result = None
    config = session.config
    if session.ctx.main:
        result = evaluate(
            state.model, session.task, config.eval, train_len=config.task.train_len, device=session.device
        )
        session.metrics_log.write({"step": state.step, "kind": "eval", **result})
        steps = config.train.steps
        summary = format_metrics(result, session.task.headline)
        log.info("%s: step %d/%d eval: %s", session.label, state.step, steps, summary)
    session.ctx.barrier()
    return result


def _finish(session: _Session, state: TrainState, n_params: int, elapsed: float) -> TrainResult:
    """The results (results.json on process 0) and the `TrainResult`."""
    config, task = session.config, session.task
    about = {
        "n_params": n_params,
        "wall_time": elapsed,
        "machine": {**machine_record(), "commit": session.commit},
    }
    results = results_record(config, task, step=state.step, metrics=state.last_eval, about=about, timing={})
    if session.writer is not None:
        session.writer.write_results(results)
        summary = format_metrics(state.last_eval, task.headline)
        log.info("%s: done in %.0f s: %s", session.label, elapsed, summary)
    run_dir = session.run_dir.path if session.run_dir is not None else None
    return TrainResult(config=config, model=state.model, results=results, run_dir=run_dir)


def _has_unused_parameters(model: nn.Module, task, device: torch.device) -> bool:
    """Whether a forward/backward pass leaves some parameter without a gradient (DDP must then
    look for them at every step). Probes with a dummy batch and restores the RNG state."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    logits = model(torch.zeros(1, 4, dtype=torch.long, device=device))
    logits.float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return unused


def _attach_file_log(path: Path | None) -> tuple[logging.Handler, int] | None:
    """Send the poslab log to ``path`` too (at INFO level) until `_detach_file_log`."""
    if path is None:
        return None
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    return handler, level


def _detach_file_log(attached: tuple[logging.Handler, int] | None) -> None:
    if attached is not None:
        handler, level = attached
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)
