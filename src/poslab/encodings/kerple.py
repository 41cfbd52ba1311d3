"""Kerple: kernelized relative positional biases (Chi et al. 2022, arXiv 2205.09921).

Two variants of one method, sharing the parameter constraint: every learned scalar is kept at or
above 1e-2 so the kernel stays conditionally positive definite. As in the official code, the
constraint is a projection of the stored values, not a clamp inside the formula: at the start of
every forward the parameters are clamped in place (without autograd), and the bias is computed from
the clamped values through an ordinary differentiable expression. A parameter that an optimizer step
pushed below the floor is thus back at the floor before it is used, and still receives its gradient,
so it can grow again (a clamp inside the formula would give it zero gradient forever). This works
with any training loop; the optimizer step itself may leave a value below the floor until the next
forward.

Built for decoders (``causal=True``, as `poslab.Transformer` builds it for a causal model), each
parameter is (H, 1, 1), the official code's shape: one value per head, broadcast over (T, S).
Otherwise it is (2, H): row 0 for keys at or before the query (the paper's parameters), row 1 for
keys after it. The paper defines Kerple for decoders; with one set of parameters per direction an
encoder can tell a key on the left from one on the right, which the symmetric kernel of |i - j|
cannot. Both rows are drawn from the same distribution. A decoder loads the (2, H) parameters of
older checkpoints by keeping row 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, as_float, load_causal_half, register

_MIN = 1e-2


def _init(values: Tensor, causal: bool | None) -> nn.Parameter:
    """A parameter from ``values`` (2, H), drawn for both directions in every mode: a decoder keeps row 0
    as (H, 1, 1), so it draws the same random numbers in the same order as an encoder (and as poslab
    before decoders dropped row 1), and every later initialisation in the model is unchanged too. Its
    3 dimensions also keep it among the parameters the lab's AdamW decays (dim >= 2), as the (2, H) one
    was, so decoder training is bit-identical to the two-row layout."""
    return nn.Parameter(values[0].reshape(-1, 1, 1).clone() if causal else values)


def _per_direction(param: Tensor, n: Tensor, *, causal: bool) -> Tensor:
    """``param`` as (H, 1, ..., 1) (causal: row 0 of a (2, H) one, or a decoder's own (H, 1, 1)) or
    as (H, *n.shape), picked by the sign of n = i - j."""
    shape = (-1,) + (1,) * n.dim()
    if param.dim() == 3:  # built for decoders
        return param.reshape(shape)
    before, after = param[0].reshape(shape), param[1].reshape(shape)
    return before if causal else torch.where(n < 0, after, before)


def _row0(saved: Tensor) -> Tensor:
    """The decoder's (H, 1, 1) parameter from a saved (2, H) one."""
    return saved[0].reshape(-1, 1, 1)


class _Kerple(PositionEncoding):
    """The parameters' mode and loading, shared by both variants."""

    hooks = frozenset({"bias"})
    _params: tuple[str, str] = ("", "")

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        return self.relative_bias(q_pos[:, None] - k_pos[None, :], causal=causal)  # (H, T, S)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        both = (2, self.n_heads)
        load_causal_half(self, state_dict, prefix, args[-1], {name: (both, _row0) for name in self._params})
        super()._load_from_state_dict(state_dict, prefix, *args)


def _distance(n: Tensor, like: Tensor, *, causal: bool) -> Tensor:
    """|i - j| as a float like ``like``; causal future entries (masked later) are 0."""
    return as_float(n.clamp(min=0) if causal else n.abs(), like)


@register("kerple_log")
class KerpleLog(_Kerple):
    """bias = -r1 * log(1 + r2 * |i - j|), r1 ~ U(0, 2), r2 ~ U(0, 1) at init, per head, direction and
    layer; both kept >= 1e-2 (see the module docstring)."""

    _params = ("r1", "r2")

    def __init__(self, *, n_heads: int, head_dim: int, causal: bool | None = None) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.causal = causal
        self.r1 = _init(torch.rand(2, n_heads) * 2, causal)
        self.r2 = _init(torch.rand(2, n_heads), causal)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor:
        self.check_mode(causal)
        # The projection; through .data, so autograd neither records it nor sees a version change.
        self.r1.data.clamp_(min=_MIN)
        self.r2.data.clamp_(min=_MIN)
        n = offsets  # i - j
        r1 = _per_direction(self.r1, n, causal=causal)
        r2 = _per_direction(self.r2, n, causal=causal)
        return -r1 * torch.log1p(r2 * _distance(n, self.r1, causal=causal))  # (H, *offsets.shape)


@register("kerple_power")
class KerplePower(_Kerple):
    """bias = -a * |i - j|^p, a ~ U(0, 1), p ~ U(0, 2) at init, per head, direction and layer; a is
    kept >= 1e-2 and p in [1e-2, 2] (see the module docstring)."""

    _params = ("a", "p")

    def __init__(self, *, n_heads: int, head_dim: int, causal: bool | None = None) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.causal = causal
        self.a = _init(torch.rand(2, n_heads), causal)
        self.p = _init(torch.rand(2, n_heads) * 2, causal)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor:
        self.check_mode(causal)
        self.a.data.clamp_(min=_MIN)
        self.p.data.clamp_(min=_MIN, max=2.0)
        n = offsets  # i - j
        a = _per_direction(self.a, n, causal=causal)
        p = _per_direction(self.p, n, causal=causal)
        d = _distance(n, self.a, causal=causal)
        # d(d^p)/dp = d^p log d is nan at d = 0; evaluate at d = 1 there (gradient 0), then zero it.
        powered = torch.where(d > 0, d.clamp(min=1) ** p, torch.zeros_like(d))
        return -a * powered  # (H, *offsets.shape)
