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

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.encodings.base import PositionEncoding, register


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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attend_current={self.attend_current}"
