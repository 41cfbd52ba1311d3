"""Whether a run fits in memory, checked before it trains or evaluates.

`check_fits` compares a lower bound on what one training step and one evaluation batch allocate
with the memory free on the device, so a size that cannot fit (``train.batch_size=10000000``,
``eval.length=10000000``, ``model.d_model=65536``) is refused in one line before any work, not
after the training by an allocator error. The bound counts only what every encoding and attention
kernel must hold (float32): the weights, their gradients and AdamW's two moments, and per token
the activations a backward pass keeps (a layer's input, its attention output, the MLP's input
and hidden layer) and the logits. The (T, T) attention scores are left out, since fused kernels
never hold them; a run the check lets through can still run out of memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from poslab.lab.config import RunConfig

FLOAT = 4  # bytes


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or MemAvailable plus free swap on Linux;
    None where it cannot be read (the check is then skipped)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.split()[1:]}
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0)


def n_parameters(config: RunConfig, task: Any) -> int:
    """The weights of the embeddings, attention and MLP projections and the output head (the
    encoding's own parameters, norms and biases are small and left out)."""
    d, layers = config.model.d_model, config.model.n_layers
    d_ff = config.model.d_ff or 4 * d
    return task.vocab_size * d + layers * (4 * d * d + 2 * d * d_ff) + d * (task.n_outputs or task.vocab_size)


def _per_token(config: RunConfig, task: Any) -> tuple[int, int]:
    """Bytes per token: of one layer's kept activations, and of the logits."""
    d = config.model.d_model
    d_ff = config.model.d_ff or 4 * d
    return FLOAT * (3 * d + d_ff), FLOAT * (task.n_outputs or task.vocab_size)


def training_bytes(config: RunConfig, task: Any, length: int) -> int:
    """Lower bound for one training step on a batch of ``length`` tokens."""
    layer, logits = _per_token(config, task)
    tokens = config.train.batch_size * length
    return 4 * FLOAT * n_parameters(config, task) + tokens * (config.model.n_layers * layer + logits)


def eval_bytes(config: RunConfig, task: Any, length: int) -> int:
    """Lower bound for one evaluation batch of ``length`` tokens (no gradients: one layer at a time)."""
    layer, logits = _per_token(config, task)
    return FLOAT * n_parameters(config, task) + config.eval.batch_size * length * (layer + logits)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(
    config: RunConfig, task: Any, device: torch.device, *, eval_lengths: list[int], training: bool = True
) -> None:
    """ValueError naming the size that cannot fit in ``device``'s free memory (training at
    ``task.train_len`` when ``training``, evaluation at each of ``eval_lengths``)."""
    free = available_bytes(device)
    if free is None:
        return
    needs = []
    if training:
        length = max(task.split_lengths("id") or [config.task.train_len])
        what = f"train.batch_size={config.train.batch_size} x task.train_len={length}"
        needs.append(
            (
                f"a training step ({what}, model.d_model={config.model.d_model})",
                training_bytes(config, task, length),
            )
        )
    for length in sorted(set(eval_lengths))[-1:]:
        what = f"eval.batch_size={config.eval.batch_size} x length {length}"
        needs.append(
            (
                f"an evaluation batch ({what}, model.d_model={config.model.d_model})",
                eval_bytes(config, task, length),
            )
        )
    for what, need in needs:
        if need > free:
            raise ValueError(
                f"out of memory: {what} needs at least {_gib(need)}, but {device} has {_gib(free)} free; "
                "lower the sizes"
            )
