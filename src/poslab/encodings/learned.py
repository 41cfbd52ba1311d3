"""Learned absolute position embeddings (GPT-2 style), added once to the token embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, check_positive, register


@register("learned")
class LearnedAbsolute(PositionEncoding):
    """A learned (max_len, d_model) table added to the token embeddings, d_model = n_heads * head_dim.

    It cannot encode positions >= max_len: ``check_length`` raises a ValueError rather than silently
    reusing or extrapolating rows.
    """

    hooks = frozenset({"embed"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int, max_len: int = 1024) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(max_len=max_len)
        self.max_len = max_len
        self.table = nn.Parameter(torch.randn(max_len, n_heads * head_dim) * 0.02)

    def check_length(self, max_position: int) -> None:
        if max_position >= self.max_len:
            raise ValueError(
                f"learned absolute positions cover 0..{self.max_len - 1}, got position {max_position}; "
                "raise max_len (and retrain) or use an encoding that extrapolates"
            )

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # a trace cannot branch on values: the lookup checks
            self.check_length(int(positions.max()))
        return x + self.table[positions]  # (T, D) broadcast over batch
