"""Stick-breaking attention (Tan et al. 2024, arXiv 2410.17980): no softmax, an implicit recency bias.

Each query breaks a stick from the nearest key backwards: key j gets the fraction sigmoid(z_ij) of what
the keys between it and the query left over,

    w_ij = sigmoid(z_ij) * prod_{j<l<i} (1 - sigmoid(z_il)),
    log w_ij = logsigmoid(z_ij) + sum_{j<l<i} logsigmoid(-z_il),

and the output is sum_j w_ij v_j; the weights sum to at most 1 (the rest is dropped). Pinned to the
official code (shawntan/stickbreaking-attention): ``stickbreaking_attention/sb_ref.py`` (``stickbreaking``,
computed in float32: ``log_z = logsigmoid(logits)``, ``log_beta = logsigmoid(-logits)``, the reverse
cumulative sum of log_beta over later keys, ``att = exp(log_z + re_cum_log_beta)``, output ``att @ v``,
the remainder ``1 - att.sum(-1)`` not added to it) and ``sb_varlen.sb_attn_varlen`` (``inv_temp =
1/sqrt(Dh)``, ``attend_current=False`` by default: the query's own key is excluded, so the first token
attends to nothing and its attention output is 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.encodings.base import PositionEncoding, register
from poslab.kernels.common import exp_normal_, hide_


def stick_breaking_weights(logits: Tensor, visible: Tensor) -> Tensor:
    """Weights (B, H, T, S) from logits z (B, H, T, S) and the keys each query may use (T, S).

    Computed in log space, in float32 at least (as the official reference); each row is one reverse
    cumulative sum over its visible keys, so rows are independent of one another.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    log_rest = F.logsigmoid(-z).masked_fill(~visible, 0.0)  # log(1 - sigmoid(z_il)), 0 where unseen
    inclusive = log_rest.flip(-1).cumsum(-1).flip(-1)  # sum_{l >= j}
    later = F.pad(inclusive[..., 1:], (0, 1))  # sum_{l > j}: one cumulative sum, no subtraction
    log_weights = (F.logsigmoid(z) + later).masked_fill(~visible, float("-inf"))
    return log_weights.exp().to(logits.dtype)


def _weights_and_gates(
    q: Tensor, k: Tensor, visible: Tensor, *, gates: bool = True, reverse: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The block's weights w and (if ``gates``) gates sigmoid(z) (B, H, t, S), z = q.k / sqrt(Dh), in
    float32 at least: `stick_breaking_weights` in fewer passes over the block, in place where autograd
    does not need them. With logsigmoid(z) = z - softplus(z) and logsigmoid(-z) = -softplus(z),

        log w_ij = logsigmoid(z_ij) + sum_{l>j} logsigmoid(-z_il) = z_ij - sum_{l>=j} softplus(z_il),

    one transcendental pass (softplus) and one cumulative sum instead of two log-sigmoids. With
    ``reverse`` the keys come last to first (w[..., ::-1], for ``v.flip(-2)``): the sum over l >= j
    is then a plain cumulative sum, and no (t, S) tensor is flipped."""
    if reverse:
        k, visible = k.flip(-2), visible.flip(-1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    z = ((q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)).to(dtype)  # the scale on the (t, Dh) side
    # z = -inf where unseen masks everything at once: softplus(z) = 0 there (nothing taken from the
    # stick), z - ... = -inf (weight 0), and the gate sigmoid(z) = 0 (no gradient).
    z = hide_(z, visible)
    spent = F.softplus(z)
    spent = spent.cumsum_(-1) if reverse else spent.flip(-1).cumsum_(-1).flip(-1)  # sum_{l>=j} softplus
    gate = torch.sigmoid(z) if gates else None
    log_weights = z.sub_(spent)
    # Weights below a few times the dtype's smallest normal number are 0, not subnormal (as a
    # flush-to-zero FPU would give), and exp never sees what would underflow (torch's slow path,
    # `exp_normal_`): long sticks are full of such weights (a few hundred keys of ~ -0.7 each).
    weights = exp_normal_(log_weights)
    return weights, gate


class _StickBreakingBlock(torch.autograd.Function):
    """w(q k^T / sqrt(Dh)) @ v for one query block, with the backward in closed form: for
    P = dw * w (rows of w and of dL/dw) and s = sigmoid(z),

        dL/dz_ij = P_ij - s_ij * sum_{l <= j} P_il   (visible keys; 0 elsewhere),

    since log w_ij = logsigmoid(z_ij) + sum_{l > j} logsigmoid(-z_il): z_ij enters its own weight
    (d/dz logsigmoid(z) = 1 - s) and, through logsigmoid(-z_ij) (derivative -s), every weight of a
    key l < j. One cumulative sum in each direction, no autograd graph through the block's
    (t, S) intermediates; w and s are kept for backward when ``save`` allows, else recomputed.
    """

    @staticmethod
    def forward(ctx, q, k, v, visible, save):  # noqa: D102
        if not save:  # backward recomputes the block: keys last to first, no gates
            weights, _ = _weights_and_gates(q, k, visible, gates=False, reverse=True)
            ctx.save_for_backward(q, k, v, visible)
            return weights.to(v.dtype) @ v.flip(-2)
        weights, gates = _weights_and_gates(q, k, visible)
        ctx.save_for_backward(q, k, v, visible, weights, gates)
        return weights.to(v.dtype) @ v

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, visible, *kept = ctx.saved_tensors
        weights, gates = kept if kept else _weights_and_gates(q, k, visible)
        grad_v = weights.to(v.dtype).transpose(-1, -2) @ grad_out
        p = (grad_out @ v.transpose(-1, -2)).to(weights.dtype).mul_(weights)
        grad_z = p.sub_(p.cumsum(-1).mul_(gates)).to(q.dtype)  # 0 where unseen: there w = 0 and s = 0
        scale = 1 / math.sqrt(q.shape[-1])  # on the (t, Dh) and (S, Dh) sides
        return (grad_z @ k) * scale, grad_z.transpose(-1, -2) @ (q * scale), grad_v, None, None


@register("stickbreaking")
class StickBreaking(PositionEncoding):
    """w_ij = sigmoid(z_ij) prod_{j<l<i} (1 - sigmoid(z_il)) in place of softmax(z) (``normalize`` hook).

    z are the logits after every other hook (A = q.k/sqrt(Dh), plus any composed bias). No parameters.
    Defined for decoders only (the stick breaks from the query towards the past): encoder mode is
    refused by ``check_mode``.

    Options:
        attend_current: include the query's own key, w_ij with the product over j < l <= i and j <= i
            (the official ``attend_current=True``); the default False is the official default.
    """

    hooks = frozenset({"normalize"})
    shared_across_layers = True
    supports_bidirectional = False

    def __init__(self, *, n_heads: int, head_dim: int, attend_current: bool = False) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.attend_current = bool(attend_current)

    def normalize(self, logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        self.check_mode(causal)
        visible = k_pos[None, :] - q_pos[:, None] < int(self.attend_current)  # j < i, or j <= i
        return stick_breaking_weights(logits, visible.to(logits.device))

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0, extra_keys=None):
        """The block's attention in one autograd node (`_StickBreakingBlock`); None (the eager path)
        when a composed bias adds to the logits."""
        if bias is not None:
            return None
        self.check_mode(causal)
        visible = (k_pos[None, :] - q_pos[:, None] < int(self.attend_current)).to(q.device)
        kept = 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * max(q.element_size(), 4)
        return _StickBreakingBlock.apply(q, k, v, visible, kept <= save_bytes)

    def block_channels(self, q: Tensor) -> int:
        """2 H: a block holds a few (t, S) tensors at once (logits, their cumulative sums, weights,
        gates), and the smaller blocks skip more of the causally hidden keys (measured: a training
        step at B 8, T 512 some 8% faster than with H)."""
        return 2 * self.n_heads

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attend_current={self.attend_current}"
