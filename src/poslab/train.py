"""The training loop: AdamW with warmup and cosine decay, clipping, periodic evaluation, atomic
checkpoints that resume to the same result, and data-parallel training under ``torchrun``.

A run lives in its own directory:

    config.json     the resolved `RunConfig`, written first
    metrics.jsonl   one JSON record per line: training loss every ``log_every`` steps, evaluations
    checkpoint.pt   the last checkpoint (see `poslab.checkpoint`)
    train.log       the log lines of the run
    results.json    the final evaluation; its presence marks a finished run

Determinism: the model is initialised from ``train.seed``, the training batches come from one
``torch.Generator`` seeded with it, and the learning rate is a function of the step, so a run
interrupted after a checkpoint and resumed ends with the same parameters and metrics as an
uninterrupted one (bit for bit on CPU).

Data parallel: launched with ``torchrun --nproc_per_node N -m poslab train ...``, every process
draws the same global batch and trains on its 1/N slice; DDP averages the gradients (gloo on CPU,
nccl on GPU). Process 0 writes the files and evaluates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from poslab.checkpoint import (
    CheckpointError,
    json_safe,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_text,
)
from poslab.config import RunConfig, TrainConfig, encoding_label, slug
from poslab.evaluate import evaluate, format_metrics, headline_metric
from poslab.model import Transformer, build_model, masked_cross_entropy
from poslab.progress import Progress

log = logging.getLogger("poslab")

CONFIG, METRICS, CHECKPOINT, RESULTS, LOG = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "results.json",
    "train.log",
)
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, RESULTS, LOG)
# Keys a resumed run may change: they alter how long it runs, when it logs, where, and how it is
# evaluated, but not what a given step learns.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.device",
    "eval.",
)


def resumable_change(key: str) -> bool:
    """Whether a resumed run may differ from its saved config in dotted ``key``."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


class RunDirError(ValueError):
    """The output directory holds a run that would be overwritten."""


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


# -- run directories -------------------------------------------------------------------------------


def run_status(run_dir: str | Path) -> str:
    """'empty' (no run files), 'finished' (results.json) or 'unfinished' (anything else)."""
    run_dir = Path(run_dir)
    if (run_dir / RESULTS).is_file():
        return "finished"
    if any((run_dir / name).exists() for name in (CONFIG, METRICS, CHECKPOINT)):
        return "unfinished"
    return "empty"


def check_run_dir(
    run_dir: str | Path, *, resume: bool, overwrite: bool, config: RunConfig | None = None
) -> str:
    """Raise `RunDirError` when ``run_dir`` holds a run and neither flag allows touching it, or when
    resuming it with a ``config`` that differs from the saved one beyond `RESUMABLE_CHANGES`.
    Returns the directory's `run_status`."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory")
    status = run_status(run_dir)
    if status != "empty" and not (resume or overwrite):
        raise RunDirError(
            f"{run_dir} already holds a {status} run; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if resume and config is not None and (run_dir / CONFIG).exists():
        changed = [k for k in config.diff(load_run_config(run_dir)) if not resumable_change(k)]
        if changed:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
                "use another --out or --overwrite"
            )
    return status


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files a run writes (and nothing else)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def plan_grid(
    base: RunConfig,
    encodings: Sequence[str],
    seeds: Sequence[int],
    root: str | Path,
    *,
    resume: bool,
    overwrite: bool,
) -> list[tuple[RunConfig, Path]]:
    """One run per encoding and seed at ``root/<encoding>/seed<k>``, every directory checked
    (`check_run_dir`) before anything trains; ValueError when two encodings share a directory."""
    grid = []
    for spec in encodings:
        for seed in seeds:
            config = base.override({"model.encoding": spec, "train.seed": seed})
            run_dir = Path(root) / slug(encoding_label(spec)) / f"seed{seed}"
            check_run_dir(run_dir, resume=resume, overwrite=overwrite, config=config)
            grid.append((config, run_dir))
    if len({d for _, d in grid}) < len(grid):
        raise ValueError("two encodings of --encodings map to the same directory; list each once")
    return grid


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config.json of a run directory."""
    path = Path(run_dir) / CONFIG
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no run ({CONFIG} is missing)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of a finished run."""
    path = Path(run_dir) / RESULTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no finished run ({RESULTS} is missing)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


# -- pieces of the loop ----------------------------------------------------------------------------


def load_model_state(model: nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights; `CheckpointError` when they do not fit the model."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit its model config ({first})") from None


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
        if "lengths" in self.split:
            lengths = self.split["lengths"]
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
) -> TrainResult:
    """Train one run and evaluate it.

    Args:
        config: the run.
        out_dir: the run directory (created if needed); None trains without writing files.
        resume: continue from ``out_dir``'s checkpoint (a fresh start when it has none). The
            config must equal the saved one except for `RESUMABLE_CHANGES` (e.g. more steps).
        overwrite: replace a run already in ``out_dir``.
        progress: draw a progress bar; None draws one only when stderr is a terminal.
        callback: called as ``callback(step, model)`` after every update (and its checkpoint).

    Raises:
        RunDirError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        NonFiniteLossError: the loss or gradient norm became NaN or infinite; the last good
            checkpoint is left as it was.
        CheckpointError: the checkpoint to resume from cannot be read.
    """
    ctx = _init_distributed(config.train.device)
    try:
        return _train(config, out_dir, ctx, resume, overwrite, progress, callback)
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
) -> TrainResult:
    tc = config.train
    if tc.batch_size % ctx.world:
        raise ValueError(
            f"train.batch_size ({tc.batch_size}) must be divisible by the number of processes ({ctx.world})"
        )
    device = resolve_device(tc.device, ctx.local_rank)
    run_dir = Path(out_dir) if out_dir is not None else None

    # Every process checks the directory before process 0 touches it.
    checkpoint = None
    if run_dir is not None:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite, config=config)
        if resume and (run_dir / CHECKPOINT).exists():
            checkpoint = load_checkpoint(run_dir / CHECKPOINT)
        ctx.barrier()
        if ctx.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if overwrite or (resume and checkpoint is None):
                clear_run_dir(run_dir)
            write_text(run_dir / CONFIG, config.to_json())
    metrics_log = _MetricsLog(run_dir / METRICS if run_dir is not None and ctx.main else None)
    file_log = _attach_file_log(run_dir / LOG if run_dir is not None and ctx.main else None)
    try:
        return _loop(config, run_dir, ctx, device, checkpoint, metrics_log, progress, callback)
    finally:
        _detach_file_log(file_log)


def _loop(config, run_dir, ctx, device, checkpoint, metrics_log, progress, callback) -> TrainResult:
    tc = config.train
    task = config.task.build()
    seed_everything(tc.seed)
    model = build_model(config.model_config(task)).to(device)
    optimizer = build_optimizer(model, tc)
    generator = torch.Generator().manual_seed(tc.seed)
    batches = BatchStream(task, config, generator)
    step, elapsed_before, last_eval = 0, 0.0, None
    if checkpoint is not None:
        load_model_state(model, checkpoint, run_dir / CHECKPOINT)
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["data_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng"):
            torch.cuda.set_rng_state(checkpoint["cuda_rng"][0], device)
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint.get("elapsed", 0.0))
        last_eval = checkpoint.get("eval")
        metrics_log.truncate_after(step)
        if ctx.main:
            log.info("resumed %s at step %d", run_dir, step)

    label = f"{config.task.name} {config.encoding_label} seed {tc.seed}"
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.main:
        log.info(
            "%s: %d parameters, %d steps, batch %d, on %s%s%s",
            label,
            n_params,
            tc.steps,
            tc.batch_size,
            device,
            f" x {ctx.world} processes" if ctx.world > 1 else "",
            f" -> {run_dir}" if run_dir is not None else "",
        )
    if ctx.world > 1:
        ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
        net = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=_has_unused_parameters(model, task, device), **ddp_args
        )
    else:
        net = model
    rows = slice(ctx.rank * tc.batch_size // ctx.world, (ctx.rank + 1) * tc.batch_size // ctx.world)

    def save(step: int, elapsed: float, last_eval: dict | None) -> None:
        if run_dir is None or not ctx.main:
            return
        state = {
            "step": step,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_rng": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "elapsed": elapsed,
            "eval": last_eval,
        }
        save_checkpoint(run_dir / CHECKPOINT, state)

    def run_eval(step: int) -> dict | None:
        result = None
        if ctx.main:
            result = evaluate(model, task, config.eval, train_len=config.task.train_len, device=device)
            metrics_log.write({"step": step, "kind": "eval", **result})
            log.info("%s: step %d/%d eval: %s", label, step, tc.steps, format_metrics(result))
        ctx.barrier()
        return result

    started = time.monotonic()
    bar = Progress(tc.steps, desc=label, initial=step, enabled=(progress if ctx.main else False))
    loss_sum, loss_count = 0.0, 0
    final_eval_done = False
    milestone = max(1, tc.steps // 10)  # without a progress bar, log progress ten times a run
    try:
        model.train()
        while step < tc.steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batches.next()
            inputs, targets, mask = (t[rows].to(device) for t in (batch.inputs, batch.targets, batch.mask))
            logits = net(inputs)
            loss = masked_cross_entropy(logits, targets, mask if tc.loss == "scored" else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            loss_value = loss.detach()
            if ctx.world > 1:
                dist.all_reduce(loss_value)
                loss_value /= ctx.world
            loss_value = float(loss_value)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                where = (
                    f"; the last good checkpoint is {run_dir / CHECKPOINT}"
                    if run_dir is not None and (run_dir / CHECKPOINT).exists()
                    else ""
                )
                raise NonFiniteLossError(
                    f"non-finite {what} ({loss_value if what == 'loss' else grad_norm}) at step "
                    f"{step + 1}; training stopped{where}. Try a lower train.lr or train.grad_clip"
                )
            optimizer.step()
            step += 1
            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            bar.update(1, loss=loss_sum / loss_count)  # mean since the last log record
            elapsed = elapsed_before + time.monotonic() - started
            if ctx.main and not bar.enabled and step % milestone == 0 and step < tc.steps:
                mean_loss = loss_sum / loss_count
                log.info("%s: step %d/%d, loss %.4f, %.0f s", label, step, tc.steps, mean_loss, elapsed)
            if tc.log_every and step % tc.log_every == 0:
                metrics_log.write(
                    {
                        "step": step,
                        "kind": "train",
                        "loss": loss_sum / loss_count,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "elapsed": elapsed,
                    }
                )
                loss_sum, loss_count = 0.0, 0
            if step == tc.steps or (tc.eval_every and step % tc.eval_every == 0):
                last_eval = run_eval(step)
                final_eval_done = step == tc.steps
            if step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                save(step, elapsed, last_eval)
            if callback is not None:
                callback(step, model)
    finally:
        bar.close()

    if not final_eval_done:  # resumed at or past the last step: evaluate what was loaded
        last_eval = run_eval(step)
    elapsed = elapsed_before + time.monotonic() - started
    results = {
        "task": config.task.name,
        "encoding": config.encoding_label,
        "seed": tc.seed,
        "step": step,
        "n_params": n_params,
        "wall_time": elapsed,
        "chance": task.chance,
        "headline": headline_metric(last_eval["splits"]) if last_eval else None,
        "metrics": last_eval,
    }
    if run_dir is not None and ctx.main:
        write_json(run_dir / RESULTS, results)
        log.info("%s: done in %.0f s: %s", label, elapsed, format_metrics(last_eval))
    return TrainResult(config=config, model=model, results=results, run_dir=run_dir)


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
