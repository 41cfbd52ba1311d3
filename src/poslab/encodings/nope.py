"""NoPE: no position encoding; the causal mask alone carries position (Kazemnejad et al. 2023)."""

from __future__ import annotations

from poslab.encodings.base import PositionEncoding, register


@register("nope")
class NoPE(PositionEncoding):
    """No position information. Undefined-free: usable in both modes, at any length.

    A bidirectional encoder with NoPE is permutation-equivariant, so it cannot solve order-dependent
    tasks; it is still allowed there as the floor of a comparison.
    """

    hooks = frozenset()
    shared_across_layers = True

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
