"""Fixed sinusoidal absolute embeddings (Vaswani et al. 2017, arXiv 1706.03762, section 3.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, register


def sinusoid_table(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """(T, dim) table: channel 2k is sin(pos / base^(2k/dim)), channel 2k+1 the matching cos."""
    half = (dim + 1) // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, dtype=torch.float64) * 2 / dim)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, half)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (T, 2*half)
    return table[:, :dim]


@register("sinusoidal")
class Sinusoidal(PositionEncoding):
    """PE(pos, 2k) = sin(pos / 10000^(2k/d)), PE(pos, 2k+1) = cos(...), added to the embeddings.

    A row of the table has norm sqrt(d / 2) (5.7 at d 64), while poslab's token embeddings start at
    std 0.02 (norm 0.16 at d 64): added as they are, the table is most of the first block's input.
    Vaswani et al. multiply the embeddings by sqrt(d) before the sum (section 3.4);
    ``scale_embeddings=True`` does that here (x sqrt(d) + PE).

    Args:
        base: the frequencies' base (10000 in the paper).
        scale_embeddings: multiply the token embeddings by sqrt(d_model) before adding the table.
    """

    hooks = frozenset({"embed"})
    shared_across_layers = True

    def __init__(
        self, *, n_heads: int, head_dim: int, base: float = 10000.0, scale_embeddings: bool = False
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        if not base > 1:
            raise ValueError(f"sinusoidal base must be > 1, got {base!r}")
        self.base, self.scale_embeddings = base, scale_embeddings

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        table = sinusoid_table(positions, x.shape[-1], self.base).to(device=x.device, dtype=x.dtype)
        if self.scale_embeddings:
            x = x * math.sqrt(x.shape[-1])
        return x + table
