"""CoPE: contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719, section 3).

Positions are counted by gates computed from the query and key, so a head can attend to "the 3rd
sentence back" rather than "512 tokens back".

The paper defines CoPE for decoders only. poslab's encoder (bidirectional) form is an extension of its
own: a key before the query and a key after it count their gates towards the query the same way, but
look their position up in two separate halves of the table, so that a head can tell left from right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, causal_mask, check_positive, load_causal_half, register
from poslab.encodings.relative import gather_positions
from poslab.kernels.cope import cope_attention


def cope_positions(gates: Tensor, q_pos: Tensor, *, causal: bool) -> Tensor:
    """Contextual positions p_ij = sum of g_it for t between j and i inclusive (eq. 3).

    Each p is one cumulative sum over the gates between the key and the query, rounded once, as the
    official flip-cumsum-flip does; the shorter rowsum - cumsum + g cancels and is ~3x less accurate in
    float32 at long lengths.

    Args:
        gates: (B, H, T, S) gate values in [0, 1]; for causal use, future keys must already be 0.
        q_pos: (T,) query positions; they index the key axis (keys are 0..S-1).
        causal: causal form (t = j..i) or the bidirectional extension (t from j up to i for a key
            before the query, from i up to j for a key after it; not in the paper).
    """
    if causal:
        return gates.flip(-1).cumsum(-1).flip(-1)
    before = torch.arange(gates.shape[-1], device=gates.device)[None, :] <= q_pos[:, None]  # (T, S)
    after = ~before
    after.scatter_(1, q_pos[:, None], True)  # the query's own gate counts on both sides
    left = gates.masked_fill(~before, 0.0).flip(-1).cumsum(-1).flip(-1)  # sum_{t=j..i}
    right = gates.masked_fill(~after, 0.0).cumsum(-1)  # sum_{t=i..j}
    return torch.where(before, left, right)


@register("cope")
class CoPE(PositionEncoding):
    """logit_ij = (q_i . k_j + q_i . e[p_ij]) / sqrt(Dh), with p from sigmoid gates (eq. 3 to 5).

    1. gates g_ij = sigmoid(q_i . k_j / sqrt(Dh)); future keys get 0.
    2. p_ij = sum_{t=j..i} g_it, clamped at npos_max - 1 (fractional, can be 0).
    3. e[p] linearly interpolated between e[floor p] and e[ceil p]; computed as z = q @ e^T once,
       then gathered, which is exactly interpolating the embeddings first (eq. 5).
    The gates get gradient only through the interpolation weight p - floor(p).

    Encoder (bidirectional) extension, not in the paper: a key after the query (j > i) counts
    p_ij = sum_{t=i..j} g_it and reads the second half of the table, e[npos_max + p]; keys at or
    before the query read the first half as above. With every gate 1 both sides count |i - j| + 1, yet
    i - 1 and i + 1 get different vectors. A module built for decoders (``causal=True``, as
    `poslab.Transformer` builds it for a causal model) has the first half only.

    Options:
        npos_max: positions per direction (positions past npos_max - 1 are clamped).
        sep_key: gates use keys of their own, a separate projection W_g x_j + b_g of the attention
            layer's input x (an (H Dh) x (H Dh) Linear owned by this module; the official code's
            ``--cope-sep-key``). The model passes x through the ``input_keys`` hook; the attention
            caches these keys with its own.
        val_gates: gates use the values, sigmoid(q_i . v_j / sqrt(Dh)).

    Attributes:
        pos_emb: learnable table, zero-initialised, shared by the heads: (npos_max, head_dim) when
            built for decoders (``causal=True``), the official code's table e; otherwise
            (2 npos_max, head_dim), rows 0..npos_max-1 that table e (keys at or before the query), the
            rest the encoder's table for keys after the query. A decoder loads the doubled table of
            older checkpoints by keeping its first half.
        gate_key: the separate key projection (``sep_key`` only).
    """

    hooks = frozenset({"logits"})

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        npos_max: int = 64,
        sep_key: bool = False,
        val_gates: bool = False,
        causal: bool | None = None,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(npos_max=npos_max)
        if sep_key and val_gates:
            raise ValueError("cope: sep_key and val_gates are exclusive ways to form the gates")
        self.npos_max = npos_max
        self.sep_key = sep_key
        self.val_gates = val_gates
        self.causal = causal
        self.pos_emb = nn.Parameter(torch.zeros(npos_max if causal else 2 * npos_max, head_dim))
        if sep_key:
            self.hooks = frozenset({"logits", "input_keys"})
            self.gate_key = nn.Linear(n_heads * head_dim, n_heads * head_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        both = (2 * self.npos_max, self.head_dim)
        load_causal_half(
            self, state_dict, prefix, args[-1], {"pos_emb": (both, lambda t: t[: self.npos_max])}
        )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def input_keys(self, x: Tensor) -> Tensor:
        """The gates' own keys (B, H, T, Dh) from the attention layer's input x (B, T, H * Dh)."""
        width = self.n_heads * self.head_dim
        if x.shape[-1] != width:
            raise ValueError(f"cope sep_key projects inputs of width {width}, got {tuple(x.shape)}")
        gk = self.gate_key(x)
        return gk.view(*x.shape[:-1], self.n_heads, self.head_dim).transpose(-2, -3)

    def gate_logits(
        self, scores: Tensor, q: Tensor, k: Tensor, v: Tensor, extra_keys: Tensor | None = None
    ) -> Tensor:
        """q . (key used for gating) / sqrt(Dh), (B, H, T, S); ``extra_keys``: from ``input_keys``."""
        if self.sep_key:
            if extra_keys is None:
                raise ValueError("cope sep_key needs its gate keys, extra_keys = input_keys(x)")
            return q @ extra_keys.to(q.dtype).transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.val_gates:
            return q @ v.transpose(-1, -2) / math.sqrt(self.head_dim)
        return scores

    def gates(self, gate_logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        """The gates g = sigmoid(gate logits) (B, H, T, S); future keys get 0 when ``causal``."""
        gates = torch.sigmoid(gate_logits)
        if causal:
            gates = gates.masked_fill(~causal_mask(q_pos, k_pos), 0.0)
        return gates

    def positions(self, gate_logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        """Clamped contextual positions p (B, H, T, S) from the gate logits."""
        gates = self.gates(gate_logits, q_pos, k_pos, causal=causal)
        return cope_positions(gates, q_pos, causal=causal).clamp(max=self.npos_max - 1)

    def logits(
        self,
        scores: Tensor,
        bias: Tensor | None,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        *,
        causal: bool,
        extra_keys: Tensor | None = None,
    ) -> Tensor:
        self.check_mode(causal)
        gate_keys = () if extra_keys is None else (extra_keys,)  # subclasses may not take them
        pos = self.positions(self.gate_logits(scores, q, k, v, *gate_keys), q_pos, k_pos, causal=causal)
        table = self.pos_emb[: self.npos_max] if causal else self.pos_emb  # the first half, or all
        z = q @ table.to(q.dtype).t() / math.sqrt(self.head_dim)  # (B, H, T, npos_max or 2 npos_max)
        pos = pos.nan_to_num(nan=0.0)  # a NaN query: a valid table index (its logits stay NaN)
        floor = pos.floor()
        weight = pos - floor  # the gates' only path to a gradient
        index_floor, index_ceil = floor.long(), pos.ceil().long()
        if not causal:  # keys after the query read the second half of the table
            side = (k_pos[None, :] > q_pos[:, None]).long() * self.npos_max  # (T, S)
            index_floor, index_ceil = index_floor + side, index_ceil + side
        z_floor = gather_positions(z, index_floor)
        z_ceil = gather_positions(z, index_ceil)
        out = scores + z_floor + weight * (z_ceil - z_floor)
        return out if bias is None else out + bias

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0, extra_keys=None):
        custom_gates = type(self).gate_logits is not CoPE.gate_logits
        if not causal or self.sep_key or self.val_gates or custom_gates:
            return None  # these variants (and subclasses with their own gates) take the eager path
        table = self.pos_emb[: self.npos_max]
        return cope_attention(q, k, v, table, bias, keep, self.npos_max, save_bytes=save_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, npos_max={self.npos_max}"
