"""RoPE: rotary position embedding (Su et al. 2021, arXiv 2104.09864), with its context scalings.

Scalings: linear position interpolation (Chen et al. 2023, arXiv 2306.15595), NTK-aware base scaling
(bloc97, 2023), and YaRN (Peng et al. 2023, arXiv 2309.00071, eq. 17-20).

YaRN's ramp comes in two forms. The paper's eq. 18 ramps in the ratio r = L / lambda (turns a
frequency makes within the original context L). The YaRN authors' code, and Hugging Face transformers
after it, ramp linearly in the channel-pair index instead, between the pair indices where r equals
beta_fast and beta_slow, rounded outwards (floor and ceil). The two differ on the frequencies inside the
ramp (for Dh = 64, factor 4, L = 2048: 12 of 32, by up to 44%); poslab uses the code's form by default
so that checkpoints trained with it rotate the same here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, as_float, check_positive, register

SCALINGS = ("none", "linear", "ntk", "yarn")
YARN_RAMPS = ("hf", "paper")


def yarn_pair_ramp(
    head_dim: int,
    base: float,
    original_max_len: int,
    beta_fast: float,
    beta_slow: float,
    *,
    truncate: bool = True,
) -> Tensor:
    """YaRN's interpolation weight per channel pair (Dh/2,), float64, as the YaRN code computes it:
    0 (keep the frequency) up to pair index floor(d(beta_fast)), 1 (divide it by the factor) from
    ceil(d(beta_slow)) on, linear in between; d(r) = Dh ln(L / (2 pi r)) / (2 ln base) is the
    (fractional) pair index whose frequency turns r times within L, and the ends are clipped to
    0..Dh-1. ``truncate=False`` skips the rounding (Hugging Face's ``truncate`` option)."""

    def pair_index(turns: float) -> float:
        return head_dim * math.log(original_max_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    width = high - low if high != low else 0.001  # as in the YaRN code: no division by zero
    return ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / width).clamp(0, 1)


@register("rope")
class RoPE(PositionEncoding):
    """Rotate channel pairs (k, k + Dh/2) of q and k by angle pos * theta_k, theta_k = base^(-2k/Dh).

    Options:
        base: the frequency base (10000).
        scaling: 'none', 'linear' (positions / factor), 'ntk' (base * factor^(Dh / (Dh - 2))), or
            'yarn' (per-frequency blend of the original and the interpolated frequency, ramping
            between beta_fast and beta_slow turns within ``original_max_len``, plus the attention
            temperature sqrt(1/t) = 0.1 ln(factor) + 1 multiplying cos and sin, so both q and k).
        factor: the context extension factor s >= 1 for the scalings.
        original_max_len: the training context L, used by YaRN's ramp.
        beta_fast, beta_slow: YaRN's ramp ends, in turns within L (32 and 1).
        yarn_ramp: 'hf' (default: linear in the pair index d between floor(d(beta_fast)) and
            ceil(d(beta_slow)), with d(r) = Dh ln(L / (2 pi r)) / (2 ln base), as the YaRN code and
            Hugging Face compute it) or 'paper' (linear in r itself, eq. 18).
        yarn_truncate: with yarn_ramp 'hf', round the ramp's ends outwards (True, Hugging Face's
            default) or keep them fractional (False, its ``truncate: false``, e.g. gpt-oss).
    """

    hooks = frozenset({"rotate"})
    shared_across_layers = True
    # cos and sin for positions 0..n-1, grown on demand: computed once, not per layer and step.
    _table: tuple[Tensor, Tensor] | None = None

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        base: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_len: int = 2048,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        yarn_ramp: str = "hf",
        yarn_truncate: bool = True,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown rope scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
        if yarn_ramp not in YARN_RAMPS:
            raise ValueError(f"unknown rope yarn_ramp {yarn_ramp!r}; choose one of {', '.join(YARN_RAMPS)}")
        if not yarn_truncate and yarn_ramp != "hf":
            raise ValueError(f"rope yarn_truncate=False applies to yarn_ramp='hf', not {yarn_ramp!r}")
        check_positive(original_max_len=original_max_len, beta_fast=beta_fast, beta_slow=beta_slow)
        if not base > 1:
            raise ValueError(f"rope base must be > 1, got {base!r}")
        if not factor >= 1:
            raise ValueError(f"rope factor must be >= 1, got {factor!r}")
        if beta_fast <= beta_slow:
            raise ValueError(f"rope needs beta_fast > beta_slow, got {beta_fast} <= {beta_slow}")
        self.base, self.scaling, self.factor = base, scaling, factor
        self.original_max_len, self.yarn_ramp = original_max_len, yarn_ramp

        k = torch.arange(head_dim // 2, dtype=torch.float64)
        if scaling == "ntk":
            base = base * factor ** (head_dim / (head_dim - 2))
        inv_freq = base ** (-2 * k / head_dim)  # (Dh/2,)
        if scaling == "linear":
            inv_freq = inv_freq / factor
        self.mscale = 1.0
        if scaling == "yarn":
            if yarn_ramp == "paper":
                # r = how many full turns a frequency makes within the original context.
                turns = original_max_len * inv_freq / (2 * math.pi)
                keep = ((turns - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1)  # 1: extrapolate
            else:
                ramp = yarn_pair_ramp(
                    head_dim, base, original_max_len, beta_fast, beta_slow, truncate=yarn_truncate
                )
                keep = 1 - ramp
            inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
            self.mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (T, Dh) at the given positions, each half of the channels repeated."""
        cos, signed_sin = self._cos_signed_sin(positions)
        half = signed_sin.shape[-1] // 2
        return cos, signed_sin[:, half:].repeat(1, 2)

    def _cos_signed_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and (-sin, sin) (T, Dh): with rotate_half(x1, x2) = (-x2, x1) on the halves of the last
        axis, rotate_half(x) * sin == x.roll(Dh/2, -1) * (-sin, sin)."""
        if positions.is_floating_point() or positions.numel() == 0:
            return self._angles(positions)
        low, high = (int(p) for p in torch.aminmax(positions))
        if low < 0:
            return self._angles(positions)
        table, freq = self._table, self.inv_freq
        if table is None or (table[0].device, table[0].dtype) != (freq.device, freq.dtype):
            table = None  # first use, or the module moved to another device or dtype
        if table is None or table[0].shape[0] <= high:
            size = max(high + 1, 2 * table[0].shape[0] if table is not None else 256)
            table = self._table = self._angles(torch.arange(size, device=self.inv_freq.device))
        positions = positions.to(table[0].device)
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    def _angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        theta = as_float(positions, self.inv_freq)[:, None] * self.inv_freq[None, :]  # (T, Dh/2)
        cos, sin = theta.cos() * self.mscale, theta.sin() * self.mscale
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (T, Dh) each

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        # x * cos + rotate_half(x) * sin in three operations instead of six.
        return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, -1), signed_sin.to(x.dtype))

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x (..., T, Dh) by the angles at ``positions`` (T,)."""
        return self._rotate(x, *self._cos_signed_sin(positions))

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        if q_pos is k_pos or (q_pos.shape == k_pos.shape and torch.equal(q_pos, k_pos)):
            angles = self._cos_signed_sin(q_pos)  # once for both (a full forward, a decoding step)
            return self._rotate(q, *angles), self._rotate(k, *angles)
        return self.apply(q, q_pos), self.apply(k, k_pos)

    def extra_repr(self) -> str:
        ramp = f", yarn_ramp={self.yarn_ramp}" if self.scaling == "yarn" else ""
        return f"{super().extra_repr()}, base={self.base}, scaling={self.scaling}, factor={self.factor}{ramp}"
