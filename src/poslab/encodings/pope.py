"""PoPE: polar coordinate position embeddings (Gopalakrishnan et al. 2025, arXiv 2509.10534).

Each query/key channel c becomes one complex number: its magnitude softplus(x_c) comes from the content
alone ("what") and its phase from the position alone ("where"), p * omega_c for a query, p * omega_c +
delta_hc for a key, with one frequency per channel, omega_c = theta^(-c/d) (d frequencies, not RoPE's
d/2 pairs), and a learned phase bias delta per head and channel, clamped to [-2 pi, 0]:

    logit_ij = sum_c softplus(q_ic) softplus(k_jc) cos((i - j) omega_c - delta_hc) / sqrt(Dh).

Pinned to lucidrains/PoPE-pytorch (``PoPE_pytorch/pope.py``: ``PoPE`` and ``apply_pope_to_qk``;
``attention.py``: ``flash_attn_with_pope`` scales by the original head dim) and x-transformers'
``PolarEmbedding`` / ``apply_polar_pos_emb`` (the same maths, one module for all layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, as_float, check_positive, register


@register("pope")
class PoPE(PositionEncoding):
    """Rotate hook: q -> softplus(q) e^{i p omega}, k -> softplus(k) e^{i (p omega + delta)}, as real pairs.

    The rotated q and k have 2 * dim + (Dh - dim) channels: the rotated channels' cosine parts, their
    sine parts (the reference interleaves the two; the dot products are the same), then the channels
    past ``dim`` unchanged (the reference's partial rotation). The attention scales logits by
    1/sqrt(channels of q), so the rotated q is multiplied by sqrt(channels / Dh): the logits are
    scaled by 1/sqrt(Dh), as the reference's ``softmax_scale`` default (the head dim before
    doubling). The KV cache keeps the rotated keys.

    Options:
        dim: rotated channels per head (default: all of them).
        theta: the frequency base (10000).
        bias_uniform_init: delta ~ U(-2 pi, 0) at init instead of 0 (the reference's option; 0 is its
            default).

    Attributes:
        phase_bias: (H, dim) the keys' phase bias delta, clamped to [-2 pi, 0] in every forward (a value
            past the bounds gets no gradient, as in the reference).
    """

    hooks = frozenset({"rotate"})
    shared_across_layers = True

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        dim: int | None = None,
        theta: float = 10000.0,
        bias_uniform_init: bool = False,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        dim = head_dim if dim is None else dim
        check_positive(dim=dim, theta=theta)
        if dim > head_dim:
            raise ValueError(f"pope: dim ({dim}) cannot exceed head_dim ({head_dim})")
        self.dim, self.theta = dim, float(theta)
        self.register_buffer("exponents", torch.arange(dim) / dim, persistent=False)  # omega = theta^-e
        self.phase_bias = nn.Parameter(torch.zeros(n_heads, dim))
        if bias_uniform_init:
            with torch.no_grad():
                self.phase_bias.uniform_(-2 * math.pi, 0.0)

    def inv_freqs(self) -> Tensor:
        """omega_c = theta^(-c / dim), (dim,), in the module's dtype."""
        return self.theta ** -self.exponents.to(self.phase_bias.dtype)

    def polar(self, x: Tensor, phase: Tensor, scale: float = 1.0) -> Tensor:
        """softplus(x[..., :dim]) at angles ``phase``, as its cosine parts, then its sine parts, then
        the rest, all times ``scale``."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # the reference runs this in float32
        rot, rest = x[..., : self.dim].to(dtype), x[..., self.dim :]
        magnitude, phase = F.softplus(rot), phase.to(dtype)
        cos, sin = phase.cos(), phase.sin()  # (T or S, dim) or (H, S, dim): scaled there, not per batch
        if scale != 1.0:
            cos, sin, rest = cos * scale, sin * scale, rest * scale
        parts = [(magnitude * cos).to(x.dtype), (magnitude * sin).to(x.dtype)]
        # One concatenation, not the reference's interleaving (a stack): the same dot products, and
        # writing whole runs of channels is about 4x faster on CPU.
        return torch.cat(parts + [rest] if rest.shape[-1] else parts, dim=-1)

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        omega = self.inv_freqs()
        delta = self.phase_bias.clamp(-2 * math.pi, 0.0)[:, None, :]  # (H, 1, dim)
        q_angles = as_float(q_pos, omega)[:, None] * omega  # (T, dim)
        k_angles = as_float(k_pos, omega)[:, None] * omega + delta  # (H, S, dim)
        channels = 2 * self.dim + (self.head_dim - self.dim)
        return self.polar(q, q_angles, math.sqrt(channels / self.head_dim)), self.polar(k, k_angles)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}, theta={self.theta}"
