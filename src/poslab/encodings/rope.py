"""RoPE: rotary position embedding (Su et al. 2021, arXiv 2104.09864), with its context scalings.

Scalings: linear position interpolation (Chen et al. 2023, arXiv 2306.15595), NTK-aware base scaling
(bloc97, 2023), YaRN (Peng et al. 2023, arXiv 2309.00071, eq. 17-20), and the other scalings of
Hugging Face's ``ROPE_INIT_FUNCTIONS``, computed as it computes them: dynamic NTK (the base recomputed
from the sequence length), Llama 3.1's (``llama3``) and LongRoPE's (Ding et al. 2024, arXiv 2402.13753;
Phi-3). Two more options shape which channels rotate: ``partial`` (Hugging Face's
``partial_rotary_factor``: only the first channels rotate) and ``p`` (p-RoPE, Barbero et al. 2024,
arXiv 2410.06205: only the highest frequencies rotate; Hugging Face's ``proportional`` rope type).

Dynamic NTK and LongRoPE depend on the sequence length, which poslab takes, as Hugging Face does, per
call: one plus the largest position that the call rotates (the keys and queries of a full forward;
the new tokens of a cached decoding step). Cached keys stay as they were rotated, so once a cached
decoding passes ``original_max_len`` its later steps differ from recomputing the whole sequence, as
in Hugging Face (docs/encodings.md states the exact rule).

YaRN's ramp comes in two forms. The paper's eq. 18 ramps in the ratio r = L / lambda (turns a
frequency makes within the original context L). The YaRN authors' code, and Hugging Face transformers
after it, ramp linearly in the channel-pair index instead, between the pair indices where r equals
beta_fast and beta_slow, rounded outwards (floor and ceil). The two differ on the frequencies inside the
ramp (for Dh = 64, factor 4, L = 2048: 12 of 32, by up to 44%); poslab uses the code's form by default
so that checkpoints trained with it rotate the same here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from poslab.encodings.base import PositionEncoding, as_float, check_positive, register

SCALINGS = ("none", "linear", "ntk", "yarn", "dynamic", "llama3", "longrope")
# Scalings whose frequencies depend on the sequence length of the call.
LENGTH_DEPENDENT = ("dynamic", "longrope")
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


def parse_factors(name: str, value: Any, n_pairs: int) -> tuple[float, ...] | None:
    """LongRoPE's per-pair factors from a list, a spec's ``(1.0,1.5,...)`` string, or one number for
    every pair; None stays None."""
    if value is None:
        return None
    items: Any = value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value] * n_pairs  # one number: the same factor for every pair
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        items = [part for part in text.split(",") if part.strip()]
    try:
        factors = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"rope {name} must be a list of numbers such as (1.0,1.5), got {value!r}") from None
    if len(factors) != n_pairs:
        raise ValueError(
            f"rope {name} needs one factor per rotated channel pair ({n_pairs}), got {len(factors)}"
        )
    if not all(f > 0 for f in factors):
        raise ValueError(f"rope {name} must be positive, got {value!r}")
    return factors


@register("rope")
class RoPE(PositionEncoding):
    """Rotate channel pairs (k, k + R/2) of the first R channels of q and k by angle pos * theta_k,
    theta_k = base^(-2k/R); R = Dh unless ``partial`` < 1.

    Options:
        base: the frequency base (10000).
        scaling: 'none', 'linear' (positions / factor), 'ntk' (base * factor^(R / (R - 2))),
            'yarn' (per-frequency blend of the original and the interpolated frequency, ramping
            between beta_fast and beta_slow turns within ``original_max_len``, plus the attention
            temperature sqrt(1/t) = 0.1 ln(factor) + 1 multiplying cos and sin, so both q and k),
            'dynamic' (dynamic NTK: at sequence length s > L = ``original_max_len`` the base becomes
            base * (factor s / L - factor + 1)^(R / (R - 2)); unscaled up to L), 'llama3' (Llama 3.1:
            wavelengths above L / low_freq_factor divided by factor, below L / high_freq_factor kept,
            a smooth blend between) or 'longrope' (theta_k / short_factor[k] up to length L,
            theta_k / long_factor[k] beyond, cos and sin times the attention factor, by default
            sqrt(1 + ln(factor) / ln(L)) for factor > 1, at every length).
        factor: the context extension factor s >= 1 for the scalings.
        original_max_len: the training context L: YaRN's ramp, llama3's wavelength bands, and the
            length past which dynamic and longrope change (Hugging Face's
            ``original_max_position_embeddings``; for 'dynamic' its ``max_position_embeddings``).
        beta_fast, beta_slow: YaRN's ramp ends, in turns within L (32 and 1).
        yarn_ramp: 'hf' (default: linear in the pair index d between floor(d(beta_fast)) and
            ceil(d(beta_slow)), with d(r) = R ln(L / (2 pi r)) / (2 ln base), as the YaRN code and
            Hugging Face compute it) or 'paper' (linear in r itself, eq. 18).
        yarn_truncate: with yarn_ramp 'hf', round the ramp's ends outwards (True, Hugging Face's
            default) or keep them fractional (False, its ``truncate: false``, e.g. gpt-oss).
        low_freq_factor, high_freq_factor: llama3's bands (1 and 4, as Llama 3.1).
        short_factor, long_factor: longrope's R/2 factors (a list, ``(1.0,1.2,...)`` in a spec, or one
            number for every pair).
        attention_factor: yarn's and longrope's factor on cos and sin, instead of their default.
        partial: the fraction of the head's channels that rotate: the first R = int(Dh * partial)
            (Hugging Face's ``partial_rotary_factor``; the rest pass unchanged). R must be even.
        p: p-RoPE: only the int(p * R / 2) highest frequencies rotate, the others are set to 0 (no
            rotation), after any scaling.
    """

    hooks = frozenset({"rotate"})
    shared_across_layers = True
    # cos and sin for positions 0..n-1, grown on demand: computed once, not per layer and step.
    # _table holds the frequencies of inv_freq; _long_table longrope's long ones.
    _table: tuple[Tensor, Tensor] | None = None
    _long_table: tuple[Tensor, Tensor] | None = None

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
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        short_factor: Any = None,
        long_factor: Any = None,
        attention_factor: float | None = None,
        partial: float = 1.0,
        p: float = 1.0,
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
        if not 0 < partial <= 1:
            raise ValueError(f"rope partial must be in (0, 1], got {partial!r}")
        rotary_dim = int(head_dim * partial)  # as Hugging Face: int(head_dim * partial_rotary_factor)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"rope partial={partial} rotates int({head_dim} * {partial}) = {rotary_dim} channels; "
                "that must be an even number >= 2"
            )
        if rotary_dim < 4 and scaling in ("ntk", "dynamic"):
            raise ValueError(f"rope scaling={scaling} needs at least 4 rotated channels, got {rotary_dim}")
        if not 0 <= p <= 1:
            raise ValueError(f"rope p must be in [0, 1], got {p!r}")
        if scaling == "llama3" and not 0 < low_freq_factor < high_freq_factor:
            raise ValueError(
                f"rope llama3 needs 0 < low_freq_factor < high_freq_factor, got {low_freq_factor}, "
                f"{high_freq_factor}"
            )
        n_pairs = rotary_dim // 2
        short, long = (
            parse_factors("short_factor", short_factor, n_pairs),
            parse_factors("long_factor", long_factor, n_pairs),
        )
        if scaling == "longrope" and (short is None or long is None):
            raise ValueError(f"rope scaling=longrope needs short_factor and long_factor ({n_pairs} each)")
        if scaling != "longrope" and (short is not None or long is not None):
            raise ValueError(f"rope short_factor and long_factor apply to scaling=longrope, not {scaling!r}")
        if attention_factor is not None:
            if scaling not in ("yarn", "longrope"):
                raise ValueError(f"rope attention_factor applies to yarn and longrope, not {scaling!r}")
            check_positive(attention_factor=attention_factor)
        self.base, self.scaling, self.factor = base, scaling, factor
        self.original_max_len, self.yarn_ramp, self.yarn_truncate = original_max_len, yarn_ramp, yarn_truncate
        self.beta_fast, self.beta_slow = beta_fast, beta_slow
        self.low_freq_factor, self.high_freq_factor = low_freq_factor, high_freq_factor
        self.short_factor, self.long_factor, self.attention_factor = short, long, attention_factor
        self.partial, self.p, self.rotary_dim = partial, p, rotary_dim
        self.n_rotating = int(p * rotary_dim // 2)  # as Hugging Face's 'proportional': int(p * Dh // 2)

        inv_freq, self.mscale = self.frequencies()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        if scaling == "longrope":
            self.register_buffer("inv_freq_long", self.frequencies(original_max_len + 1)[0].float(), False)

    def frequencies(self, seq_len: int | None = None) -> tuple[Tensor, float]:
        """(inv_freq (R/2,) in float64, the factor on cos and sin) at sequence length ``seq_len``
        (None: the unscaled length, as Hugging Face's init), as ``ROPE_INIT_FUNCTIONS`` computes them."""
        dim, base, factor, length = self.rotary_dim, self.base, self.factor, self.original_max_len
        exponent = torch.arange(dim // 2, dtype=torch.float64) * 2 / dim
        mscale = 1.0
        if self.scaling == "ntk":
            base = base * factor ** (dim / (dim - 2))
        elif self.scaling == "dynamic":
            s = max(seq_len or length, length)
            base = base * (factor * s / length - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = base**-exponent
        if self.scaling == "linear":
            inv_freq = inv_freq / factor
        elif self.scaling == "yarn":
            if self.yarn_ramp == "paper":
                # r = how many full turns a frequency makes within the original context.
                turns = length * inv_freq / (2 * math.pi)
                keep = ((turns - self.beta_slow) / (self.beta_fast - self.beta_slow)).clamp(0, 1)
            else:
                ramp = yarn_pair_ramp(
                    dim, base, length, self.beta_fast, self.beta_slow, truncate=self.yarn_truncate
                )
                keep = 1 - ramp  # 1: extrapolate (keep the frequency)
            inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        elif self.scaling == "llama3":
            wavelen = 2 * math.pi / inv_freq
            low, high = self.low_freq_factor, self.high_freq_factor
            low_wavelen, high_wavelen = length / low, length / high
            smooth = (length / wavelen - low) / (high - low)
            scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        elif self.scaling == "longrope":
            long = seq_len is not None and seq_len > length
            ext = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float64)
            inv_freq = inv_freq / ext
            mscale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(length))
        if self.attention_factor is not None:
            mscale = self.attention_factor
        inv_freq[self.n_rotating :] = 0.0  # p-RoPE: the lowest frequencies do not rotate
        return inv_freq, mscale

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (T, R) at the given positions, each half of the rotated channels repeated
        (a length-dependent scaling takes the sequence length as max(positions) + 1)."""
        cos, signed_sin = self._cos_signed_sin(positions)
        half = signed_sin.shape[-1] // 2
        return cos, signed_sin[:, half:].repeat(1, 2)

    def _long(self, seq_len: int | None) -> bool:
        return self.scaling in LENGTH_DEPENDENT and seq_len is not None and seq_len > self.original_max_len

    def _cos_signed_sin(self, positions: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """cos and (-sin, sin) (T, R): with rotate_half(x1, x2) = (-x2, x1) on the halves of the
        rotated channels, rotate_half(x) * sin == x.roll(R/2, -1) * (-sin, sin). ``seq_len`` (for
        dynamic and longrope) defaults to max(positions) + 1."""
        if seq_len is None and self.scaling in LENGTH_DEPENDENT and positions.numel():
            seq_len = int(positions.max()) + 1
        long = self._long(seq_len)
        if long and self.scaling == "dynamic":  # new frequencies at every length: no table
            inv_freq, mscale = self.frequencies(seq_len)
            return self._angles(positions, inv_freq.to(self.inv_freq), mscale)
        freq = self.inv_freq_long if long else self.inv_freq
        # The table's size depends on the positions' values, which a torch.compile trace cannot branch
        # on: compiled, the angles are computed directly (the same products, cos and sin).
        if positions.is_floating_point() or positions.numel() == 0 or torch.compiler.is_compiling():
            return self._angles(positions, freq, self.mscale)
        low, high = (int(p) for p in torch.aminmax(positions))
        if low < 0:
            return self._angles(positions, freq, self.mscale)
        name = "_long_table" if long else "_table"
        table = getattr(self, name)
        if table is None or (table[0].device, table[0].dtype) != (freq.device, freq.dtype):
            table = None  # first use, or the module moved to another device or dtype
        if table is None or table[0].shape[0] <= high:
            size = max(high + 1, 2 * table[0].shape[0] if table is not None else 256)
            table = self._angles(torch.arange(size, device=freq.device), freq, self.mscale)
            setattr(self, name, table)
        positions = positions.to(table[0].device)
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    @staticmethod
    def _angles(positions: Tensor, inv_freq: Tensor, mscale: float) -> tuple[Tensor, Tensor]:
        theta = as_float(positions, inv_freq)[:, None] * inv_freq[None, :]  # (T, R/2)
        cos, sin = theta.cos() * mscale, theta.sin() * mscale
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (T, R) each

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        # x * cos + rotate_half(x) * sin in three operations instead of six, on the first R channels.
        dim = cos.shape[-1]
        if dim == x.shape[-1]:
            return torch.addcmul(x * cos.to(x.dtype), x.roll(dim // 2, -1), signed_sin.to(x.dtype))
        rot, rest = x[..., :dim], x[..., dim:]
        rot = torch.addcmul(rot * cos.to(x.dtype), rot.roll(dim // 2, -1), signed_sin.to(x.dtype))
        return torch.cat((rot, rest), dim=-1)

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x (..., T, Dh) by the angles at ``positions`` (T,)."""
        return self._rotate(x, *self._cos_signed_sin(positions))

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        seq_len = None
        if self.scaling in LENGTH_DEPENDENT and q_pos.numel() and k_pos.numel():
            # one length for the call, as Hugging Face's max(position_ids) + 1
            seq_len = max(int(q_pos.max()), int(k_pos.max())) + 1
        if q_pos is k_pos or (q_pos.shape == k_pos.shape and torch.equal(q_pos, k_pos)):
            angles = self._cos_signed_sin(q_pos, seq_len)  # once for both (a full forward, a step)
            return self._rotate(q, *angles), self._rotate(k, *angles)
        q_angles, k_angles = self._cos_signed_sin(q_pos, seq_len), self._cos_signed_sin(k_pos, seq_len)
        return self._rotate(q, *q_angles), self._rotate(k, *k_angles)

    def extra_repr(self) -> str:
        extra = f", yarn_ramp={self.yarn_ramp}" if self.scaling == "yarn" else ""
        if self.partial != 1:
            extra += f", partial={self.partial}"
        if self.p != 1:
            extra += f", p={self.p}"
        scaled = f"scaling={self.scaling}, factor={self.factor}"
        return f"{super().extra_repr()}, base={self.base}, {scaled}{extra}"
