"""Selective attention (Leviathan, Kalman and Matias 2024, arXiv 2410.02703).

A token may decide that an earlier token is no longer needed by any later token: one designated head's
(ReLU'd) attention logits are accumulated along the queries and subtracted from every head's logits of
the queries after it:

    S_tj = relu(A^(h0)_tj) for 0 < j < t (never the first token, the BOS, and never itself), else 0,
    F_ij = sum_{t<i} S_tj = sum_{j<t<i} relu(A^(h0)_tj),
    logit_ij = A_ij - F_ij   (every head).

Pinned to the paper's own listing (section 3, the selective attention code: ``S = attn_logits[:, 0]``,
``relu``, ``S[..., 0] = 0``, ``S = (1 - eye) * S``, ``roll(S, 1, -2)`` with the first row zeroed,
``F = cumsum(S, axis=-2)``, ``attn_logits -= F[:, None]``); there is no official code repository.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from poslab.encodings.base import PositionEncoding, consecutive_start, register
from poslab.kernels.bias import bias_attention


def _selection(queries: Tensor, keys: Tensor, t_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
    """S (B, n, S): relu of the selecting head's logits of the queries at ``t_pos``, kept for keys
    0 < j < t (a query never selects the first key or itself)."""
    keep = (k_pos[None, :] < t_pos[:, None]) & (k_pos[None, :] > 0)
    # The scale on the (n, D) side, and a product with keep instead of masked_fill (not vectorised on
    # CPU: `poslab.kernels.common.hidden_mask`).
    return F.relu((queries[:, t_pos] * scale) @ keys.transpose(-1, -2) * keep.to(queries.dtype))


def selection_penalty(
    queries: Tensor,
    keys: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    scale: float,
    prefix: tuple[Tensor, tuple[int, int]] | None = None,
) -> Tensor:
    """F (B, T, S) for the queries at ``q_pos`` from the selecting head's queries and keys.

    Args:
        queries: (B, n, D) the selecting head's queries at positions 0..n-1, n >= max(q_pos).
        keys: (B, S, D) its keys at ``k_pos`` (0..S-1).
        q_pos: (T,) the positions whose penalty is wanted.
        scale: the attention's logit scale (1/sqrt(D)).
        prefix: ``(P, (first, last))``, the positions ``q_pos`` span and P (B, S'), S' >= S, the
            penalty's sum over the queries t < first (`selection_prefixes`), so that only the queries
            first..last-1 are summed here; None: from 0.
    """
    if prefix is not None:  # the block's rows: the prefix plus sum_{first <= t < i} S_t
        prefix, (first, last) = prefix
        t_pos = torch.arange(first, last, device=k_pos.device)
        rows = _selection(queries, keys, t_pos, k_pos, scale)
        # Row r = prefix + S_first + ... + S_{first+r-1}: the prefix as row 0 of one cumulative sum
        # (no padding, no separate add); consecutive queries first..last read every row as it is.
        accumulated = torch.cat((prefix[:, None, : keys.shape[1]].to(rows.dtype), rows), dim=1).cumsum(1)
        if consecutive_start(q_pos) == first and q_pos.shape[0] == accumulated.shape[1]:
            return accumulated
        return accumulated[:, q_pos - first]
    # F_i reads the queries t < i only; a torch.compile trace cannot read max(q_pos) and takes all n
    # rows instead (the rows past it are computed, never read).
    n_hist = queries.shape[1] if torch.compiler.is_compiling() else int(q_pos.max())
    t_pos = torch.arange(n_hist, device=k_pos.device)
    accumulated = F.pad(_selection(queries, keys, t_pos, k_pos, scale).cumsum(-2), (0, 0, 1, 0))
    return accumulated[:, q_pos]  # row i: sum_{t<i} S_t; row 0 is 0


def selection_prefixes(
    queries: Tensor, keys: Tensor, starts: list[int], k_pos: Tensor, scale: float
) -> list[Tensor]:
    """For each of the ascending ``starts`` a, sum_{t < a} S_t (B, S): one pass over the queries,
    chunk by chunk, so query blocks cost O(T S) together instead of O(T^2 S)."""
    running = keys.new_zeros(keys.shape[0], keys.shape[1])
    prefixes, done = [], 0
    for start in starts:
        if start > done:
            t_pos = torch.arange(done, start, device=k_pos.device)
            if torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad):
                chunk = checkpoint(_summed, queries, keys, t_pos, k_pos, scale, use_reentrant=False)
            else:
                chunk = _summed(queries, keys, t_pos, k_pos, scale)
            running = running + chunk
            done = start
        prefixes.append(running)
    return prefixes


def _summed(queries: Tensor, keys: Tensor, t_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
    return _selection(queries, keys, t_pos, k_pos, scale).sum(-2)


@register("selective")
class Selective(PositionEncoding):
    """logit_ij = A_ij - sum_{j<t<i} relu(A^(head)_tj) for keys 0 < j, no parameters (``logits`` hook).

    The selection needs the designated head's logits of earlier queries too, so the encoding's extra
    keys are the layer's own queries (``queries_as_extra_keys``): a full forward uses q itself, and the
    KV cache keeps the (rotated) queries beside the keys, so cached decoding recomputes F from them.
    The selecting logits are q.k/sqrt(Dh) of that head after any rotation (no composed bias). Decoders
    only (the paper's method is causal): encoders are refused.

    Options:
        head: the selecting head (0, as the paper).
    """

    hooks = frozenset({"logits", "input_keys"})
    queries_as_extra_keys = True
    supports_bidirectional = False

    def __init__(self, *, n_heads: int, head_dim: int, head: int = 0) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        if not 0 <= head < n_heads:
            raise ValueError(f"selective: head must be in 0..{n_heads - 1}, got {head}")
        self.head = head

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
        context: tuple[Tensor, tuple[int, int]] | None = None,
    ) -> Tensor:
        self.check_mode(causal)
        if extra_keys is None:
            raise ValueError("selective needs the queries of every key position as extra_keys")
        out = scores - self._penalty(q, k, extra_keys, q_pos, k_pos, context)[:, None].to(scores.dtype)
        return out if bias is None else out + bias

    def _penalty(self, q, k, extra_keys, q_pos, k_pos, context) -> Tensor:
        """F (B, t, S) of the selecting head for the queries at ``q_pos`` (`selection_penalty`)."""
        h, scale = self.head, 1 / math.sqrt(q.shape[-1])
        return selection_penalty(extra_keys[:, h].to(k.dtype), k[:, h], q_pos, k_pos, scale, context)

    def attention_block(
        self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0, extra_keys=None, context=None
    ):
        """The block as one SDPA flash call with -penalty (plus any bias) as its float mask, one per
        sequence (`poslab.kernels.bias.bias_attention`, whose backward gives the mask its gradient);
        None (the eager path, checkpointed) on other devices, while torch.compile traces, or when
        what backward keeps (the penalty's (B, t, S) intermediates and the mask) does not fit in
        ``save_bytes``."""
        self.check_mode(causal)
        if extra_keys is None or q.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        # Kept for backward: about 4 (B, t, S) tensors of the penalty, and the mask, per head with a bias.
        planes = 4 + (0 if bias is None else q.shape[1])
        if (
            torch.is_grad_enabled()
            and planes * q.shape[0] * q.shape[2] * k.shape[2] * q.element_size() > save_bytes
        ):
            return None
        penalty = self._penalty(q, k, extra_keys, q_pos, k_pos, context)[:, None].to(q.dtype)
        mask = -penalty if bias is None else bias.to(q.dtype) - penalty
        # A hint: backward's blocks stop at the causal edge (clipped to the keys there).
        return bias_attention(q, k, v, mask, keep, causal_start=consecutive_start(q_pos))

    def block_context(
        self,
        q: Tensor,
        k: Tensor,
        extra_keys: Tensor | None,
        spans: list[tuple[int, int]],
        k_pos: Tensor,
        *,
        causal: bool,
    ) -> list[tuple[Tensor, tuple[int, int]]] | None:
        """Each query block's penalty sum over the queries before it, made in one pass."""
        starts = [first for first, _ in spans]
        if extra_keys is None or len(spans) < 2 or starts != sorted(starts):
            return None  # one block, or positions out of order: each block sums from 0 itself
        scale = 1 / math.sqrt(q.shape[-1])
        h = self.head
        prefixes = selection_prefixes(extra_keys[:, h].to(k.dtype), k[:, h], starts, k_pos, scale)
        return list(zip(prefixes, spans, strict=True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head={self.head}"
