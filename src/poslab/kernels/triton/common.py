"""Shared helpers of the Triton kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.kernels.triton import interpreting


def block_sizes(q: Tensor) -> tuple[int, int]:
    """(queries, keys) per tile: 16 x 16 under the interpreter (small tests), 64 x 64 on a GPU."""
    return (16, 16) if interpreting() or not q.is_cuda else (64, 64)


def float32_zeros(shape, like: Tensor) -> Tensor:
    """A float32 zero buffer on ``like``'s device (gradients are accumulated atomically in float32)."""
    return torch.zeros(shape, dtype=torch.float32, device=like.device)
