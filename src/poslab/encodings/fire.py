"""FIRE: functional interpolation for relative positions (Li et al., ICLR 2024, arXiv 2310.04418)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, as_float, check_positive, register

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}  # LeakyReLU: PyTorch's slope, 0.01
DEFAULT_THRESHOLD = 256.0  # the official FIRE class's default (init_L = 512, halved)


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
        c = self.c.abs()
        n = q_pos[:, None] - k_pos[None, :]  # (T, S), > 0 for keys on the left
        left_far = as_float(q_pos, c)[:, None]  # (T, 1): the farthest key on the left is key 0
        if causal:  # future entries clamped to 0: they are masked later
            x = self._normalised(n.clamp(min=0), left_far, c)
        else:
            right_far = as_float(k_pos.numel() - 1 - q_pos, c)[:, None]  # (T, 1): key S - 1
            right = n < 0
            x = self._normalised(n.abs(), torch.where(right, right_far, left_far), c)
            x = torch.where(right, -x, x)
        return self.mlp(x[..., None]).permute(2, 0, 1)  # (T, S, H) -> (H, T, S)

    def _normalised(self, distance: Tensor, far: Tensor, c: Tensor) -> Tensor:
        """psi(distance) / (psi(max(far, L)) + eps)."""
        norm = torch.log1p(c * torch.maximum(far, self.threshold)) + self.eps
        return torch.log1p(c * as_float(distance, c)) / norm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
