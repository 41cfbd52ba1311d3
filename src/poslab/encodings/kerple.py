"""Kerple: kernelized relative positional biases (Chi et al. 2022, arXiv 2205.09921).

Two variants of one method, sharing the parameter constraint: every learned scalar is clamped at
1e-2 so the kernel stays conditionally positive definite.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, as_float, register, relative_distance

_MIN = 1e-2


@register("kerple_log")
class KerpleLog(PositionEncoding):
    """bias = -r1_h * log(1 + r2_h * n), r1 ~ U(0, 2), r2 ~ U(0, 1) at init, one per head and layer."""

    hooks = frozenset({"bias"})

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.r1 = nn.Parameter(torch.rand(n_heads) * 2)
        self.r2 = nn.Parameter(torch.rand(n_heads))

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        n = as_float(relative_distance(q_pos, k_pos, causal=causal), self.r1)
        r1 = self.r1.clamp(min=_MIN)[:, None, None]
        r2 = self.r2.clamp(min=_MIN)[:, None, None]
        return -r1 * torch.log1p(r2 * n)  # (H, T, S)


@register("kerple_power")
class KerplePower(PositionEncoding):
    """bias = -a_h * n^p_h with 0 < p <= 2; a ~ U(0, 2), p ~ U(0, 2) at init, per head and layer."""

    hooks = frozenset({"bias"})

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.a = nn.Parameter(torch.rand(n_heads) * 2)
        self.p = nn.Parameter(torch.rand(n_heads) * 2)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        n = as_float(relative_distance(q_pos, k_pos, causal=causal), self.a)
        a = self.a.clamp(min=_MIN)[:, None, None]
        p = self.p.clamp(min=_MIN, max=2.0)[:, None, None]
        # d(n^p)/dp = n^p log n is nan at n = 0; evaluate at n = 1 there (gradient 0), then zero it.
        powered = torch.where(n > 0, n.clamp(min=1) ** p, torch.zeros_like(n))
        return -a * powered  # (H, T, S)
