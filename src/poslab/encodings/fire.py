"""FIRE: functional interpolation for relative positions (Li et al., ICLR 2024, arXiv 2310.04418)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, as_float, check_positive, register

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}  # LeakyReLU: PyTorch's slope, 0.01
DEFAULT_THRESHOLD = 256.0  # the official FIRE class's default (init_L = 512, halved)


def piecewise_linear(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """``mlp(x[..., None])`` as (H, *x.shape), for mlp = Linear(1, D) -> ReLU or LeakyReLU -> Linear(D, H).

    With a scalar input, unit k is on (its pre-activation w1_k x + b1_k > 0) on one side of its kink
    -b1_k / w1_k, so f is linear between the sorted kinks: f(x) = A_p x + C_p in piece p, with
    A_p = W2 (s_p * w1), C_p = W2 (s_p * b1) + b2 and s_pk = 1 for a unit on, the negative slope (0
    for ReLU) for one off. A, C ((D + 1)^2, H) come from the parameters by ordinary autograd; the
    pieces are found by binary search among the kinks. Per x this costs H multiply-adds and a
    lookup, forward and backward, against 2D(H + 1) and a (.., D) hidden layer for the MLP itself.

    Ties behave as the MLP's: a unit whose pre-activation is 0 is off (value 0, derivative the
    negative slope), for both signs of w1, so x on a kink (x = 0 on the diagonal with b1_k = 0) gets
    the MLP's gradient. x within rounding of a kink may land on the other side of it, which changes
    the value by rounding only and the derivative to the other one-sided one.
    """
    lin1, act, lin2 = mlp
    w1, b1, w2, b2 = lin1.weight[:, 0], lin1.bias, lin2.weight, lin2.bias
    width = w1.shape[0]
    slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
    with torch.no_grad():
        # A unit with w1 = 0 is always on (b1 > 0: its kink at -inf) or always off (at +inf); it
        # counts as rising (on for x above its kink).
        rising = w1 >= 0
        kinks = torch.where(w1 != 0, -b1 / w1, torch.where(b1 > 0, -math.inf, math.inf))
        sorted_kinks, order = kinks.sort()
        rank = order.argsort()  # unit k is the rank[k]-th lowest kink
        pieces = torch.arange(width + 1, device=x.device)
        # Piece (p, q): p kinks lie below x and q at or below it (q > p only when x is on a kink).
        # A rising unit is on iff its kink is below x, a falling one iff its kink is above x.
        below = rank < pieces[:, None, None]  # (D + 1, 1, D) indexed by p
        above = rank >= pieces[None, :, None]  # (1, D + 1, D) indexed by q
        on = torch.where(rising, below, above).reshape((width + 1) ** 2, width)
        flat = x.detach().contiguous()
        piece = torch.searchsorted(sorted_kinks, flat) * (width + 1) + torch.searchsorted(
            sorted_kinks, flat, right=True
        )
    scales = torch.where(on, w1.new_ones(()), w1.new_full((), slope))  # ((D + 1)^2, D)
    slopes = (scales @ (w2 * w1).t()).t()  # (H, (D + 1)^2)
    intercepts = (scales @ (w2 * b1).t() + b2).t()
    index = piece.flatten()
    out = torch.addcmul(intercepts.index_select(1, index), slopes.index_select(1, index), x.reshape(1, -1))
    return out.view(-1, *x.shape)  # (H, *x.shape)


@register("fire")
class FIRE(PositionEncoding):
    """bias = f(psi(i - j) / (psi(max(i, L)) + eps)), psi(x) = log(|c| x + 1), f an MLP 1 -> width -> H.

    As in the official code (the DAPE repository's FIRE): c starts at ``init_c`` and enters through
    its absolute value; the threshold is L = |s * L0| with L0 fixed at ``threshold`` and the learned
    multiplier s starting at 1 (so an optimizer moves L in steps proportional to L0); eps = 1e-6.
    The normalisation by the query position i puts the MLP's input in [0, 1] for causal attention at
    any length, which is what lets FIRE extrapolate. One module per layer.

    Bidirectional (encoder) attention, for which the official code (causal only) has no form: a key
    after the query gets the negated input, -psi(j - i) / (psi(max(S - 1 - i, L)) + eps), normalised
    by the farthest key on its own side, so the MLP sees [-1, 0) on the right and [0, 1] on the left
    and can tell a key one step to the left from one step to the right. Causal attention is unchanged.

    Options:
        width: hidden width of f.
        init_c: initial c.
        threshold: L0, the initial L; None: half of ``train_len`` (rounded down) when that is given,
            as the official configs do, else 256 (the official class's default).
        train_len: the training length; only sets the default threshold (a run config passes it).
        activation: f's nonlinearity, 'relu' (plain FIRE) or 'leaky_relu' (the official DAPE-FIRE,
            which ``dape[base=fire]`` selects).
    """

    hooks = frozenset({"bias"})
    eps = 1e-6

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        width: int = 32,
        init_c: float = 0.1,
        threshold: float | None = None,
        train_len: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        if threshold is None:
            threshold = DEFAULT_THRESHOLD if train_len is None else float(train_len // 2)
        check_positive(width=width, init_c=init_c, threshold=threshold)
        if activation not in ACTIVATIONS:
            raise ValueError(f"fire activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.mlp = nn.Sequential(nn.Linear(1, width), ACTIVATIONS[activation](), nn.Linear(width, n_heads))
        self.c = nn.Parameter(torch.tensor(float(init_c)))
        self.threshold_scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_threshold", torch.tensor(float(threshold)))

    @property
    def threshold(self) -> Tensor:
        """The learned threshold L = |s * L0| (a scalar tensor)."""
        return (self.threshold_scale * self.init_threshold).abs()

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        x = self._inputs(q_pos, k_pos, causal)
        return self.mlp(x[..., None]).permute(2, 0, 1)  # (T, S, H) -> (H, T, S)

    def fast_bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None = None) -> Tensor:
        """``bias`` with f evaluated as the piecewise linear function it is (`piecewise_linear`):
        H numbers per (query, key) instead of the width-D hidden layer, forward and backward."""
        return piecewise_linear(self.mlp, self._inputs(q_pos, k_pos, causal))

    def _inputs(self, q_pos: Tensor, k_pos: Tensor, causal: bool) -> Tensor:
        """The MLP's input x (T, S)."""
        c = self.c.abs()
        n = q_pos[:, None] - k_pos[None, :]  # (T, S), > 0 for keys on the left
        left_far = as_float(q_pos, c)[:, None]  # (T, 1): the farthest key on the left is key 0
        if causal:  # future entries clamped to 0: they are masked later
            return self._normalised(n.clamp(min=0), left_far, c)
        right_far = as_float(k_pos.numel() - 1 - q_pos, c)[:, None]  # (T, 1): key S - 1
        right = n < 0
        x = self._normalised(n.abs(), torch.where(right, right_far, left_far), c)
        return torch.where(right, -x, x)

    def _normalised(self, distance: Tensor, far: Tensor, c: Tensor) -> Tensor:
        """psi(distance) / (psi(max(far, L)) + eps)."""
        norm = torch.log1p(c * torch.maximum(far, self.threshold)) + self.eps
        return torch.log1p(c * as_float(distance, c)) / norm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
