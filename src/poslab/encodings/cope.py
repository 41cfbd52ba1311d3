"""CoPE: contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719, section 3).

Positions are counted by gates computed from the query and key, so a head can attend to "the 3rd
sentence back" rather than "512 tokens back".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, causal_mask, check_positive, register
from poslab.encodings.relative import gather_positions
from poslab.kernels.cope import cope_attention


def cope_positions(gates: Tensor, q_pos: Tensor, *, causal: bool) -> Tensor:
    """Contextual positions p_ij = sum of g_it for t between j and i inclusive (eq. 3).

    Args:
        gates: (B, H, T, S) gate values in [0, 1]; for causal use, future keys must already be 0.
        q_pos: (T,) query positions; they index the key axis (keys are 0..S-1).
        causal: causal form (t = j..i) or the bidirectional extension (t between j and i on
            whichever side j lies; not in the paper).
    """
    if causal:
        # Reverse cumulative sum along keys, as rowsum - cumsum + g (one pass, no flips).
        csum = gates.cumsum(-1)
        return csum[..., -1:] - csum + gates
    csum = gates.cumsum(-1)  # C[j] = sum_{t <= j} g_t
    index = q_pos.view(1, 1, -1, 1).expand(*gates.shape[:-1], 1)
    c_i = csum.gather(-1, index)  # (B, H, T, 1): C[i]
    g_i = gates.gather(-1, index)  # g_ii
    j_before = torch.arange(gates.shape[-1], device=gates.device)[None, :] <= q_pos[:, None]
    return torch.where(j_before, c_i - csum + gates, csum - c_i + g_i)


@register("cope")
class CoPE(PositionEncoding):
    """logit_ij = (q_i . k_j + q_i . e[p_ij]) / sqrt(Dh), with p from sigmoid gates (eq. 3 to 5).

    1. gates g_ij = sigmoid(q_i . k_j / sqrt(Dh)); future keys get 0.
    2. p_ij = sum_{t=j..i} g_it, clamped at npos_max - 1 (fractional, can be 0).
    3. e[p] linearly interpolated between e[floor p] and e[ceil p]; computed as z = q @ e^T once,
       then gathered, which is exactly interpolating the embeddings first (eq. 5).
    The gates get gradient only through the interpolation weight p - floor(p).

    Options:
        npos_max: size of the position table (positions past it are clamped).
        sep_key: gates use their own keys M_h k_j (a learned per-head Dh x Dh map of the attention
            keys, i.e. a separate key projection restricted to the span of W_k) instead of k_j.
        val_gates: gates use the values, sigmoid(q_i . v_j / sqrt(Dh)).

    Attributes:
        pos_emb: (npos_max, head_dim) learnable table e, zero-initialised, shared by the heads.
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
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        check_positive(npos_max=npos_max)
        if sep_key and val_gates:
            raise ValueError("cope: sep_key and val_gates are exclusive ways to form the gates")
        self.npos_max = npos_max
        self.sep_key = sep_key
        self.val_gates = val_gates
        self.pos_emb = nn.Parameter(torch.zeros(npos_max, head_dim))
        if sep_key:
            eye = torch.eye(head_dim).expand(n_heads, head_dim, head_dim)
            self.gate_key = nn.Parameter(eye.clone())  # (H, Dh, Dh), starts at the attention keys

    def gate_logits(self, scores: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q . (key used for gating) / sqrt(Dh), (B, H, T, S)."""
        if self.sep_key:
            gk = torch.einsum("bhsd,hde->bhse", k, self.gate_key.to(k.dtype))
            return q @ gk.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.val_gates:
            return q @ v.transpose(-1, -2) / math.sqrt(self.head_dim)
        return scores

    def positions(self, gate_logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        """Clamped contextual positions p (B, H, T, S) from the gate logits."""
        gates = torch.sigmoid(gate_logits)
        if causal:
            gates = gates.masked_fill(~causal_mask(q_pos, k_pos), 0.0)
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
    ) -> Tensor:
        pos = self.positions(self.gate_logits(scores, q, k, v), q_pos, k_pos, causal=causal)
        z = q @ self.pos_emb.to(q.dtype).t() / math.sqrt(self.head_dim)  # (B, H, T, npos_max)
        floor = pos.floor()
        weight = pos - floor  # the gates' only path to a gradient
        z_floor = gather_positions(z, floor.long())
        z_ceil = gather_positions(z, pos.ceil().long())
        out = scores + z_floor + weight * (z_ceil - z_floor)
        return out if bias is None else out + bias

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0):
        custom_gates = type(self).gate_logits is not CoPE.gate_logits
        if not causal or self.sep_key or self.val_gates or custom_gates:
            return None  # these variants (and subclasses with their own gates) take the eager path
        return cope_attention(q, k, v, self.pos_emb, bias, keep, self.npos_max, save_bytes=save_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, npos_max={self.npos_max}"
