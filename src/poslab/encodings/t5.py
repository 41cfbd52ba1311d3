"""T5 relative position buckets (Raffel et al. 2020, arXiv 1910.10683, section 2.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, check_positive, register, relative_distance


def t5_bucket(n: Tensor, *, n_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Bucket of a non-negative distance n: exact below n_buckets/2, then log-spaced up to
    max_distance, capped at n_buckets - 1. With the defaults: n < 16 -> n, else
    16 + floor(log(n/16) / log(128/16) * 16), at most 31.
    """
    exact = n_buckets // 2
    n_float = n.to(torch.float32).clamp(min=1)  # avoids log(0); those entries take the exact branch
    log_bucket = exact + (
        torch.log(n_float / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    ).to(torch.long)
    return torch.where(n < exact, n, log_bucket.clamp(max=n_buckets - 1))


@register("t5")
class T5Bias(PositionEncoding):
    """One learned scalar per (bucket, head); causal buckets over n = i - j (|i - j| for encoders).

    Shared by all layers, as in T5.
    """

    hooks = frozenset({"bias"})
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int, n_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(n_buckets=n_buckets, max_distance=max_distance)
        if n_buckets < 4 or max_distance <= n_buckets // 2:
            raise ValueError(
                f"t5 needs n_buckets >= 4 and max_distance > n_buckets / 2, "
                f"got n_buckets={n_buckets}, max_distance={max_distance}"
            )
        self.n_buckets = n_buckets
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.randn(n_buckets, n_heads) * 0.02)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        n = relative_distance(q_pos, k_pos, causal=causal)
        buckets = t5_bucket(n, n_buckets=self.n_buckets, max_distance=self.max_distance)
        return self.table[buckets].permute(2, 0, 1)  # (T, S, H) -> (H, T, S)
