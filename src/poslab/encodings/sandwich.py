"""Sandwich: a parameter-free bias from sinusoidal inner products (Chi et al. 2023, arXiv 2212.10356)."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, check_positive, register


@register("sandwich")
class Sandwich(PositionEncoding):
    """bias_h(d) = sum_k cos(d / (r_h * 10000^(2k/d'))) - d'/2, the inner product p_i . p_j of two
    sinusoidal vectors of size d' (which depends only on d = i - j), shifted so the diagonal is 0.

    Each head compresses positions by its own ratio r_h = 8h/H (h = 1..H), the per-head scaling the
    paper uses in place of ALiBi's slopes; the bias decays (non-monotonically) with distance.

    Bidirectional (encoder) attention, which the paper does not define: a cosine is even, so the bias
    of |i - j| alone cannot tell left from right. As poslab's bidirectional ALiBi does (after the
    randomized positional encodings code), keys before the query count as half a step closer:
    d = |i - j| - 0.5 for j < i, d = j - i for j >= i. Causal attention is unchanged.

    The frequencies are computed in the module's dtype from exact integers at every call, so
    ``.double()`` gives float64 values.
    """

    hooks = frozenset({"bias"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int, dim: int = 128) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(dim=dim)
        if dim % 2:
            raise ValueError(f"sandwich dim must be even, got {dim}")
        self.dim = dim
        # Integers, exact in any dtype; they also carry the module's dtype and device.
        self.register_buffer("channel", torch.arange(dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("head", torch.arange(1, n_heads + 1, dtype=torch.float32), persistent=False)

    @property
    def freqs(self) -> Tensor:
        """1 / (r_h * 10000^(2k/d')), (H, d'/2)."""
        ratios = 8.0 * self.head / self.n_heads  # (H,)
        return 10000.0 ** (-2.0 * self.channel / self.dim)[None, :] / ratios[:, None]

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        twice = self._twice_distance(q_pos[:, None] - k_pos[None, :], causal)  # (T, S)
        # The bias depends on d alone: tabulate it once per distinct half-step, then index.
        table = self._at_twice(torch.arange(int(twice.max()) + 1, device=twice.device))  # (H, N)
        return table[:, twice]  # (H, T, S)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor:
        return self._at_twice(self._twice_distance(offsets, causal))  # (H, *offsets.shape)

    @staticmethod
    def _twice_distance(n: Tensor, causal: bool) -> Tensor:
        """Twice the distance d, an integer, from n = i - j (> 0 for keys on the left): 2n causal
        (future entries, masked later, at 0), 2|n| - 1 for keys on the left of an encoder's query."""
        return 2 * n.clamp(min=0) if causal else 2 * n.abs() - (n > 0).long()

    def _at_twice(self, twice: Tensor) -> Tensor:
        """The bias (H, *twice.shape) at the distances twice / 2."""
        freqs = self.freqs
        distances = twice.to(freqs.dtype) / 2
        angles = distances[None, ..., None] * freqs.view(freqs.shape[0], *(1,) * twice.dim(), -1)
        return angles.cos().sum(-1) - self.dim / 2
