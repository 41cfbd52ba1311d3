"""Learned relative position embeddings (Shaw et al. 2018, arXiv 1803.02155), capped.

The "Relative PE" baseline of the CoPE paper (arXiv 2405.18719, section 5): an extra logit
q_i . r[min(i - j, max_dist)]. CoPE with every gate equal to 1 is exactly this with r[n] = e[n + 1].

In an encoder, keys after the query read a second table, as Shaw et al.'s signed, clipped distance
(one vector per j - i in -max_dist..max_dist) does, so that a head can tell left from right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import (
    PositionEncoding,
    check_positive,
    consecutive_start,
    load_causal_half,
    register,
    relative_distance,
)
from poslab.kernels.bias import table_bias_attention


def gather_positions(z: Tensor, index: Tensor) -> Tensor:
    """Pick z[..., t, index[t, s]] for every (t, s): z (B, H, T, P), index (T, S) or (B, H, T, S)."""
    if index.dim() == 2:
        index = index.expand(*z.shape[:-2], *index.shape)
    return z.gather(-1, index)  # (B, H, T, S)


@register("relative")
class RelativePE(PositionEncoding):
    """logit += q_i . r[min(n, max_dist)] / sqrt(Dh), n = i - j.

    The table is zero-initialised like CoPE's and shared by the heads; by default one table is shared
    across layers too, as in the CoPE paper's code. Past max_dist the last vector is reused (the
    paper's "relative-capped").

    In an encoder, a key after the query (j > i) reads r[max_dist + 1 + min(j - i, max_dist)]
    instead: the second half of the table, the same layout as CoPE's encoder form, so CoPE with every
    gate 1 stays this encoding in both modes (Shaw et al.'s clipped signed distance, with the distance-0
    row of the second half unused).

    Attributes:
        pos_emb: (max_dist + 1, head_dim) when built for decoders (``causal=True``); otherwise
            (2 (max_dist + 1), head_dim), rows 0..max_dist for keys at or before the query, the rest
            for keys after it. A decoder loads the doubled table of older checkpoints by keeping its
            first half.
    """

    hooks = frozenset({"logits"})
    shared_across_layers = True

    def __init__(
        self, *, n_heads: int, head_dim: int, max_dist: int = 63, causal: bool | None = None
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(max_dist=max_dist)
        self.max_dist = max_dist
        self.causal = causal
        rows = max_dist + 1
        self.pos_emb = nn.Parameter(torch.zeros(rows if causal else 2 * rows, head_dim))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        rows = self.max_dist + 1
        load_causal_half(
            self, state_dict, prefix, args[-1], {"pos_emb": ((2 * rows, self.head_dim), lambda t: t[:rows])}
        )
        super()._load_from_state_dict(state_dict, prefix, *args)

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
    ) -> Tensor:
        self.check_mode(causal)
        z = q @ self._table(causal).to(q.dtype).t() / math.sqrt(self.head_dim)  # (B, H, T, rows)
        out = scores + gather_positions(z, self._rows(q_pos, k_pos, causal=causal))
        return out if bias is None else out + bias

    def _table(self, causal: bool) -> Tensor:
        return self.pos_emb[: self.max_dist + 1] if causal else self.pos_emb

    def _rows(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        """The table row each (query, key) reads, (T, S)."""
        n = relative_distance(q_pos, k_pos, causal=causal).clamp(max=self.max_dist)
        if causal:
            return n
        return torch.where(k_pos[None, :] > q_pos[:, None], n + self.max_dist + 1, n)

    def attention_block(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        q_pos: Tensor,
        k_pos: Tensor,
        keep: Tensor | None,
        *,
        causal: bool,
        save_bytes: int = 0,
    ) -> Tensor | None:
        """The logits' q_i . r_n term as a bias read from the (B, H, t, rows) table q r^T, through
        SDPA's CPU flash kernel (`poslab.kernels.bias.table_bias_attention`): no (B, H, t, S) logits
        kept for backward. None (the eager path) off CPU, under a summed bias, or in half precision."""
        if bias is not None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
            return None
        self.check_mode(causal)
        table = self._table(causal)
        z = q @ table.to(q.dtype).t() / math.sqrt(self.head_dim)  # (B, H, t, rows)
        if keep is None:
            return table_bias_attention(q, k, v, z, self._rows(q_pos, k_pos, causal=causal))
        start = consecutive_start(q_pos)
        if start is not None and start + q.shape[2] <= k.shape[2]:  # the capped Toeplitz layout
            return table_bias_attention(q, k, v, z, None, causal_start=start)
        rows = self._rows(q_pos, k_pos, causal=causal).masked_fill(~keep, table.shape[0])  # R: hidden
        return table_bias_attention(q, k, v, z, rows, causal_start=start)
