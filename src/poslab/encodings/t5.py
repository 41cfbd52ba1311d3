"""T5 relative position buckets (Raffel et al. 2020, arXiv 1910.10683, section 2.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, check_positive, register


def t5_bucket(
    n: Tensor, *, n_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False
) -> Tensor:
    """Bucket of the relative position n = i - j (query minus key), as T5 and Hugging Face's
    ``_relative_position_bucket`` compute it.

    Causal: future keys (n < 0) share bucket 0 with n = 0; a distance n >= 0 is exact below
    n_buckets/2, then log-spaced up to max_distance, capped at n_buckets - 1. With the defaults:
    n < 16 -> n, else 16 + floor(log(n/16) / log(128/16) * 16), at most 31.

    Bidirectional: each direction gets half the buckets. Keys at or before the query take the
    buckets 0..h-1 of |n| (h = n_buckets // 2, exact below h/2), keys after it h..2h-1, so a key one
    step to the left and one to the right get different buckets. With the defaults: 8 exact, 8
    log-spaced up to 128 per side. The logarithm is taken in float32, as in the reference, so the
    bucket boundaries agree exactly.
    """
    if bidirectional:
        half = n_buckets // 2
        return _magnitude_bucket(n.abs(), half, max_distance) + half * (n < 0).long()
    return _magnitude_bucket(n.clamp(min=0), n_buckets, max_distance)


def _magnitude_bucket(n: Tensor, n_buckets: int, max_distance: int) -> Tensor:
    exact = n_buckets // 2
    n_float = n.to(torch.float32).clamp(min=1)  # avoids log(0); those entries take the exact branch
    log_bucket = exact + (
        torch.log(n_float / exact) / math.log(max_distance / exact) * (n_buckets - exact)
    ).to(torch.long)
    return torch.where(n < exact, n, log_bucket.clamp(max=n_buckets - 1))


@register("t5")
class T5Bias(PositionEncoding):
    """One learned scalar per (bucket, head): bias = table[bucket(i - j), h]; see `t5_bucket` for the
    causal and the bidirectional (encoder) bucket layouts. Shared by all layers, as in T5.
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
        return self.relative_bias(q_pos[:, None] - k_pos[None, :], causal=causal)  # (H, T, S)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor:
        buckets = t5_bucket(
            offsets, n_buckets=self.n_buckets, max_distance=self.max_distance, bidirectional=not causal
        )
        return self.table[buckets].movedim(-1, 0)  # (*offsets.shape, H) -> (H, *offsets.shape)
