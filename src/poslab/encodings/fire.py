"""FIRE: functional interpolation for relative positions (Li et al., ICLR 2024, arXiv 2310.04418)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.encodings.base import (
    PositionEncoding,
    as_float,
    check_positive,
    register,
    relative_distance,
)


@register("fire")
class FIRE(PositionEncoding):
    """bias = f(psi(n) / psi(max(L, i))), psi(x) = log(c x + 1), f an MLP 1 -> width -> H.

    c (init 0.1) and the threshold L (init ``threshold``) are learned; both are kept positive. The
    normalisation by the query position i makes the MLP's input lie in [0, 1] for causal attention at
    any length, which is what lets FIRE extrapolate. One module per layer.
    """

    hooks = frozenset({"bias"})

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        width: int = 32,
        init_c: float = 0.1,
        threshold: float = 512.0,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(width=width, init_c=init_c, threshold=threshold)
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, n_heads))
        self.c = nn.Parameter(torch.tensor(float(init_c)))
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        c = self.c.clamp(min=1e-4)
        n = as_float(relative_distance(q_pos, k_pos, causal=causal), c)  # (T, S)
        i = as_float(q_pos, c)
        norm = torch.log1p(c * torch.maximum(self.threshold.clamp(min=1.0), i))  # (T,)
        x = torch.log1p(c * n) / norm[:, None]  # (T, S)
        return self.mlp(x[..., None]).permute(2, 0, 1)  # (T, S, H) -> (H, T, S)
