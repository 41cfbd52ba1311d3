"""Shared helpers of the Triton kernels."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def interpreting() -> bool:
    """Whether triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (queries, keys) per tile on a GPU, per kernel; guesses, not yet tuned on one. The DAPE kernels hold
# every head of a tile (V2: five shifted tiles of A and B), so theirs are smaller.
GPU_BLOCKS = {"flash": (64, 64), "dape": (32, 32), "dape_v2": (16, 16)}


def block_sizes(q: Tensor, kind: str = "flash") -> tuple[int, int]:
    """(queries, keys) per tile: 16 x 16 under the interpreter (small tests), ``GPU_BLOCKS`` on a GPU."""
    return (16, 16) if interpreting() or not q.is_cuda else GPU_BLOCKS[kind]


def float32_zeros(shape, like: Tensor) -> Tensor:
    """A float32 zero buffer on ``like``'s device (gradients are accumulated atomically in float32)."""
    return torch.zeros(shape, dtype=torch.float32, device=like.device)
