"""FoX: the Forgetting Transformer's forget gate (Lin et al. 2025, arXiv 2503.02130).

Every token t carries a per-head forget gate f_t = sigmoid(w_f . x_t + b_f) computed from the attention
layer's input x, and a query at i discounts the key at j by every gate in between:

    logit_ij = q_i . k_j / sqrt(Dh) + sum_{l=j+1..i} log f_l = A_ij + c_i - c_j,  c_t = sum_{l<=t} log f_l

a data-dependent ALiBi (a constant gate f gives ALiBi with slope -log f). Pinned to the official code
(zhixuan-lin/forgetting-transformer): ``ForgettingAttentionLayer`` (``fgate_type="full"``:
``fgate_proj = nn.Linear(hidden_size, num_heads, bias=True)``, weight ~ N(0, 0.02), bias 0, no special
bias init; ``log_fgate = logsigmoid(fgate_logit.float())``) and ``ops/forgetting_attention.py``
(``log_lambda = cumsum(log_fgate)`` in float32, logits + log_lambda_i - log_lambda_j, causal only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslab.encodings.base import PositionEncoding, register
from poslab.kernels.common import hide_


def forget_bias(log_fgate: Tensor, q_pos: Tensor) -> Tensor:
    """The FoX bias c_i - c_j (B, H, T, S) from log forget gates (B, H, S) of every key.

    c is one cumulative sum along the keys (in float32 at least, as the official code); future entries
    (j > i) are positive and masked later by the attention.
    """
    dtype = torch.promote_types(log_fgate.dtype, torch.float32)
    c = log_fgate.to(dtype).cumsum(-1)  # (B, H, S)
    return c[..., q_pos, None] - c[..., None, :]


@register("fox")
class FoX(PositionEncoding):
    """logit_ij = A_ij + sum_{l=j+1..i} log sigmoid(w_f,h . x_l + b_f,h), per head (causal only).

    The gate logits come from the layer input through the ``input_keys`` hook: ``input_keys(x)`` returns
    log f (B, H, T, 1), which the KV cache keeps beside the keys, so cached decoding recomputes the
    cumulative sums from the cached log gates. The bias is applied through the ``logits`` hook (it is
    data-dependent, so not a ``bias``); ``attention_block`` runs each query block as one SDPA call with
    the bias c_i - c_j as its float mask (no (T, S, T) tensor anywhere).

    The method is defined for decoders only (the official kernel asserts ``causal``): encoder mode is
    refused by ``check_mode``.

    Options:
        gate_bias: the gate projection's initial bias (0, the official initialisation: every gate
            starts near sigmoid(0) = 0.5, a discount of e^-0.69 per token). A positive value starts
            the gates open (5: f ~ 0.993, e^-0.0067 per token); for studying the start, not a method.

    Attributes:
        fgate: the forget-gate projection, Linear(H * Dh, H) with bias (weight ~ N(0, 0.02), bias
            ``gate_bias``, by default the official ``fgate_type="full"`` initialisation).
    """

    hooks = frozenset({"logits", "input_keys"})
    supports_bidirectional = False

    def __init__(self, *, n_heads: int, head_dim: int, gate_bias: float = 0.0) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.gate_bias = float(gate_bias)
        self.fgate = nn.Linear(n_heads * head_dim, n_heads)
        nn.init.normal_(self.fgate.weight, std=0.02)
        nn.init.constant_(self.fgate.bias, self.gate_bias)

    def input_keys(self, x: Tensor) -> Tensor:
        """log f (B, H, T, 1) from the attention layer's input x (B, T, H * Dh)."""
        width = self.n_heads * self.head_dim
        if x.shape[-1] != width:
            raise ValueError(f"{self.name} projects inputs of width {width}, got {tuple(x.shape)}")
        return self.log_gate(self.fgate(x)).transpose(-1, -2).unsqueeze(-1)

    @staticmethod
    def log_gate(z: Tensor) -> Tensor:
        """log f from the gate logits: logsigmoid(z)."""
        return F.logsigmoid(z)

    def _bias(self, extra_keys: Tensor | None, q_pos: Tensor, like: Tensor) -> Tensor:
        if extra_keys is None:
            raise ValueError(f"{self.name} needs its log forget gates, extra_keys = input_keys(x)")
        return forget_bias(extra_keys[..., 0], q_pos).to(like.dtype)

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
        out = scores + self._bias(extra_keys, q_pos, scores)
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_bias={self.gate_bias:g}"

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0, extra_keys=None):
        mask = self._bias(extra_keys, q_pos, q)  # (B, H, t, S), a fresh tensor
        if bias is not None:
            mask = mask + bias
        if keep is not None:  # in place (a copy cost a quarter of the forward), and no masked_fill
            mask = hide_(mask, keep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@register("cable")
class Cable(FoX):
    """CABLE, context-aware biases for length extrapolation (arXiv 2503.08067; axiomlab/Cable).

    Each token t gets a learned, context-aware per-head bias softplus(w_h . x_t + c_h) >= 0 and the
    logits are penalised by the biases between key and query:

        logit_ij = A_ij + z_i - z_j,   z_t = -sum_{l<=t} softplus(w_h . x_l + c_h),

    as the official ``CausalSelfAttention`` (``b = cumsum(-softplus(h_attn(x)), dim=1)``,
    ``Bias = b.unsqueeze(3) - b.unsqueeze(2)``; nanoGPT init: weight ~ N(0, 0.02), bias 0). Since
    -softplus(h) = logsigmoid(-h), this is FoX with the gate logits negated (tested): the same family
    and, at init, the same distribution; everything but ``log_gate`` is FoX's (cache, fused blocks,
    decoders only).

    Options:
        gate_bias: the projection's initial bias c_h (0, the official nanoGPT initialisation:
            softplus(0) = 0.69 per token); -5 starts the biases near 0 (0.0067 per token).

    Attributes:
        fgate: the bias projection, Linear(H * Dh, H) (the official ``h_attn`` / ``b_attn``).
    """

    @staticmethod
    def log_gate(z: Tensor) -> Tensor:
        """The (negative) per-token bias -softplus(z)."""
        return -F.softplus(z)
