"""ALiBi: a linear distance penalty per head (Press et al. 2022, arXiv 2108.12409)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, as_float, register, relative_distance


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes m_1..m_H: 2^(-8k/H) for H a power of two.

    Otherwise the slopes of the nearest lower power of two, then every other slope of the list for
    twice that size (H=12: 2^-1..2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5), as in the paper's code.
    """

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two(n_heads)
    lower = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]


@register("alibi")
class ALiBi(PositionEncoding):
    """bias = -m_h * (i - j) causal, -m_h * |i - j| bidirectional; the full relative matrix.

    The row-constant shortcut (-m_h * -j) gives the same softmax but not the same logits, and DAPE's
    MLP reads the logits, so the true matrix is built.
    """

    hooks = frozenset({"bias"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_heads)), persistent=False)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        n = as_float(relative_distance(q_pos, k_pos, causal=causal), self.slopes)
        return -self.slopes[:, None, None] * n  # (H, T, S)
