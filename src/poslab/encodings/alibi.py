"""ALiBi: a linear distance penalty per head (Press et al. 2022, arXiv 2108.12409)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, as_float, register


def alibi_exponents(n_heads: int) -> list[float]:
    """Base-2 logarithms of the head slopes: m_h = 2^e_h, e_h = -8k/H for H a power of two.

    Otherwise the exponents of the nearest lower power of two, then every other exponent of the list
    for twice that size (H=12: -1..-8, then -0.5, -1.5, -2.5, -3.5), as in the paper's code. Every
    exponent is a multiple of a power of two (-8k/2^a), so it is exact in any floating format.
    """

    def power_of_two(n: int) -> list[float]:
        return [-8.0 * k / n for k in range(1, n + 1)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two(n_heads)
    lower = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes m_1..m_H (2^-1..2^-8 for H = 8); see `alibi_exponents`."""
    return [2.0**e for e in alibi_exponents(n_heads)]


@register("alibi")
class ALiBi(PositionEncoding):
    """bias = -m_h * (i - j) for causal attention; the full relative matrix.

    Bidirectional (encoder) attention needs a bias that tells a key on the left from one on the
    right, which -m_h * |i - j| cannot. As in the randomized positional encodings code of Ruoss et al.
    (arXiv 2305.16843), whose protocol the Chomsky-hierarchy results follow, keys before the query
    (j < i) get +0.5 m_h: bias = -m_h * (|i - j| - 0.5 [j < i]), i.e. a key on the left counts as
    half a step closer than the key at the same distance on the right. The causal form is unchanged.

    The row-constant shortcut (-m_h * -j) gives the same softmax but not the same logits, and DAPE's
    MLP reads the logits, so the true matrix is built. The slopes are computed in the module's dtype
    from exact exponents (``.double()`` gives float64 slopes, not float32 ones widened).
    """

    hooks = frozenset({"bias"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.register_buffer("exponents", torch.tensor(alibi_exponents(n_heads)), persistent=False)

    @property
    def slopes(self) -> Tensor:
        """m_h (H,), in the dtype and on the device of the module."""
        return torch.exp2(self.exponents)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        return self.relative_bias(q_pos[:, None] - k_pos[None, :], causal=causal)  # (H, T, S)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor:
        slopes = self.slopes
        n = offsets  # > 0 for keys on the left
        if causal:  # future entries clamped to 0: they are masked later
            distance = as_float(n.clamp(min=0), slopes)
        else:
            distance = as_float(n.abs(), slopes) - 0.5 * as_float(n > 0, slopes)
        return -slopes.view(-1, *(1,) * n.dim()) * distance  # (H, *offsets.shape)
