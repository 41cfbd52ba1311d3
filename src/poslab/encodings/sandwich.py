"""Sandwich: a parameter-free bias from sinusoidal inner products (Chi et al. 2023, arXiv 2212.10356)."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, check_positive, register, relative_distance


@register("sandwich")
class Sandwich(PositionEncoding):
    """bias_h(n) = sum_k cos(n / (r_h * 10000^(2k/d'))) - d'/2, the inner product p_i . p_j of two
    sinusoidal vectors of size d' (which depends only on n = i - j), shifted so the diagonal is 0.

    Each head compresses positions by its own ratio r_h = 8h/H (h = 1..H), the per-head scaling the
    paper uses in place of ALiBi's slopes; the bias decays (non-monotonically) with distance.
    """

    hooks = frozenset({"bias"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int, dim: int = 128) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(dim=dim)
        if dim % 2:
            raise ValueError(f"sandwich dim must be even, got {dim}")
        self.dim = dim
        freqs = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32) * 2 / dim)  # (d'/2,)
        ratios = 8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads  # (H,)
        self.register_buffer("freqs", freqs[None, :] / ratios[:, None], persistent=False)  # (H, d'/2)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        n = relative_distance(q_pos, k_pos, causal=causal)  # (T, S)
        # The bias depends on n alone: tabulate it once per distinct distance, then index.
        distances = torch.arange(int(n.max()) + 1, device=n.device, dtype=self.freqs.dtype)
        angles = distances[None, :, None] * self.freqs[:, None, :]  # (H, N, d'/2)
        table = angles.cos().sum(-1) - self.dim / 2  # (H, N)
        return table[:, n]  # (H, T, S)
