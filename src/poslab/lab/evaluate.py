"""Held-out evaluation: metrics per split, and per length for splits that are length ranges.

Flip-flop reports error per split (id, ood_sparse, ood_dense) at one length; a Chomsky task
reports accuracy at every evaluated length of each split and the mean over those lengths, which
for the ``ood`` split is the OOD score of Ruoss et al. (arXiv 2305.16843). Every split and length
is scored on ``eval.batches`` batches from its own seed (`eval_seed`), disjoint from any training
seed and identical across runs, so all runs of a comparison see the same test sequences.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from poslab.lab.config import EvalConfig

log = logging.getLogger("poslab")


def eval_seed(seed: int, split: str, length: int) -> int:
    """Data seed of one held-out (split, length): at least 2**32, above every training seed."""
    return ((1 + seed) << 32) | zlib.crc32(f"{split}/{length}".encode())


def eval_lengths(
    split_lengths: Sequence[int] | None, config: EvalConfig, default_len: int | None
) -> list[int]:
    """Lengths to evaluate a split at: every ``len_stride``-th of its range ``split_lengths`` (the
    top included), or the one fixed length (``eval.length``, else the training length)."""
    if split_lengths is not None:
        lengths = list(split_lengths[:: config.len_stride])
        top = split_lengths[-1]
        return lengths if lengths[-1] == top else [*lengths, top]
    length = config.length if config.length is not None else default_len
    assert length is not None, "a fixed-length split needs eval.length or task.train_len"
    return [length]


def planned_lengths(task, config: EvalConfig, train_len: int | None) -> list[int]:
    """Every length `evaluate` will run ``task`` at, over the splits it evaluates."""
    splits = list(config.splits) if config.splits is not None else list(task.splits())
    return sorted({n for s in splits for n in eval_lengths(task.split_lengths(s), config, train_len)})


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task,
    config: EvalConfig,
    *,
    train_len: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Score ``model`` on held-out batches of ``task``.

    Args:
        model: maps token ids (B, T) to logits (B, T, task.n_outputs).
        task: a `poslab.lab.tasks.Task`.
        config: which splits, lengths and how many batches.
        train_len: the length of fixed-length splits when ``config.length`` is None.
        device: where to run (default: the model's device).

    Returns:
        ``{"splits": {split: {metric: value}}, "lengths": {split: {length: {metric: value}}}}``;
        metrics are the task's (percentages), averaged over batches; a length-range split's
        summary is the mean over its lengths. ``lengths`` holds only the length-range splits. A
        length the model cannot run at (a ValueError, e.g. past a learned absolute table) is
        logged as a warning and scored NaN, so one encoding's limit does not stop a sweep.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    splits = task.splits()
    names = list(config.splits) if config.splits is not None else list(splits)
    result: dict[str, Any] = {"splits": {}, "lengths": {}}
    known_metrics = {"error": None, "seq_error": None}  # ordered set, grown by what the task reports
    try:
        for name in names:
            params, split_lengths = splits[name], task.split_lengths(name)
            per_length = {}
            for length in eval_lengths(split_lengths, config, train_len):
                generator = torch.Generator().manual_seed(eval_seed(config.seed, name, length))
                scores = []
                for _ in range(config.batches):
                    batch = task.sample(config.batch_size, length, generator=generator, **params)
                    batch = batch.to(device)
                    try:
                        logits = model(batch.inputs)
                    except ValueError as error:  # e.g. past a learned absolute table's max_len
                        log.warning("%s at length %d not evaluated: %s", name, length, error)
                        scores = [dict.fromkeys(known_metrics, math.nan)]
                        break
                    scores.append(task.metrics(logits, batch))
                    known_metrics.update(dict.fromkeys(scores[-1]))
                per_length[length] = mean_metrics(scores)
            result["splits"][name] = mean_metrics(list(per_length.values()))
            if split_lengths is not None:
                result["lengths"][name] = {str(k): v for k, v in per_length.items()}
    finally:
        model.train(was_training)
    return result


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over records, ignoring NaN (NaN when every record is NaN)."""
    keys = dict.fromkeys(k for r in records for k in r)
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r and not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def format_metrics(result: dict[str, Any], headline: str) -> str:
    """One line: ``id error 1.23 | ood_sparse error 4.56 | ...`` (the task's headline metric, in %)."""
    return " | ".join(
        f"{split} {headline} {m.get(headline, math.nan):.2f}" for split, m in result["splits"].items()
    )
