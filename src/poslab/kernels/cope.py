"""Fused CoPE attention for one block of queries, with a hand-written backward.

Exactly the math of ``poslab.encodings.cope.CoPE`` followed by mask, softmax and the value product
(docs/attention.md, CoPE), but: unless the caller lets the block keep its intermediates (``save_bytes``,
a share of ``poslab.attention.SAVE_BYTES``), the forward keeps nothing of size (T, S) for backward
(only the output and the row log-sum-exp) and the backward recomputes the block; intermediate
tensors are reused in place. On CPU the allocation of large fresh tensors costs as much as the
arithmetic, so fewer, reused buffers are most of the speed-up; memory stays O(block x S). Temporaries
that die within the call live in ``common.scratch`` buffers, reused across blocks and calls, so the
speed does not depend on the process's allocator settings.

Gradients (per row i; p the clamped positions, w = p - floor p, d = z[ceil p] - z[floor p]):
    dlogits = a * (dO . v_j - dO . o_i)                   softmax and value product
    dz[floor p] += dlogits * (1 - w);  dz[ceil p] += dlogits * w
    dp = dlogits * d           (zero where p was clamped, since then floor p = ceil p)
    dg_it = sum_{j <= t} dp_ij (p is a reverse cumulative sum of the gates)
    ds = dlogits + dg * g * (1 - g)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.kernels.common import attention_backward, needs_autograd, row_softmax_, scratch


def _forward_block(q, k, v, table, bias, keep, npos_max, *, saved: bool = False):
    """All the block's intermediates, (B, H, t, S) each, reusing buffers where the math allows.

    The logits and the pure temporaries live in scratch buffers (``common.scratch``); so do the
    others unless ``saved`` (the forward keeps them for backward: fresh tensors)."""
    shape = (*q.shape[:-1], k.shape[2])

    def buffer(name: str, dtype: torch.dtype | None = None) -> Tensor:
        if saved:
            return torch.empty(shape, dtype=dtype or q.dtype, device=q.device)
        return scratch(f"cope_{name}", shape, q, dtype)

    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q, k.transpose(-1, -2), out=scratch("cope_logits", shape, q)).mul_(scale)  # A
    gates = torch.sigmoid(logits, out=buffer("gates"))
    if keep is not None:
        gates.masked_fill_(~keep, 0.0)
    # p = reverse cumulative sum, one rounding per entry (rowsum - cumsum + g cancels in float32)
    pos = gates.flip(-1).cumsum_(-1).flip(-1).clamp_(max=npos_max - 1)
    floor = torch.ceil(pos, out=scratch("cope_floor", shape, q))  # ceil p for now
    idx_ceil = buffer("idx_ceil", torch.int64).copy_(floor)
    torch.floor(pos, out=floor)
    idx_floor = buffer("idx_floor", torch.int64).copy_(floor)
    weight = pos.sub_(floor)  # w = p - floor p, in p's buffer
    z = torch.matmul(q, table.t()).mul_(scale)  # (B, H, t, P)
    z_floor = torch.gather(z, -1, idx_floor, out=floor)  # floor p is no longer needed
    delta = torch.gather(z, -1, idx_ceil, out=buffer("delta")).sub_(z_floor)  # d = z[ceil] - z[floor]
    logits.add_(z_floor).addcmul_(weight, delta)
    if bias is not None:
        logits.add_(bias)
    if keep is not None:
        logits.masked_fill_(~keep, float("-inf"))
    return logits, gates, weight, delta, idx_floor, idx_ceil


class CoPEAttentionFn(torch.autograd.Function):
    """softmax(CoPE logits + bias, causal) @ v for one query block; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, table, bias, keep, npos_max, save):  # noqa: D102
        logits, *rest = _forward_block(q, k, v, table, bias, keep, npos_max, saved=save)
        probs, lse = row_softmax_(logits, need_lse=not save)
        # Either the block's intermediates (backward skips the recomputation) or the row lse.
        saved = (probs, *rest) if save else (lse,)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, table, bias, keep, out, *saved)
        ctx.npos_max = npos_max
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, table, bias, keep, out, *saved = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        kept = len(saved) > 1  # saved tensors must stay intact (a second backward may read them)
        if kept:
            probs, gates, weight, delta, idx_floor, idx_ceil = saved
        else:
            logits, gates, weight, delta, idx_floor, idx_ceil = _forward_block(
                q, k, v, table, bias, keep, ctx.npos_max
            )
            probs = logits.sub_(saved[0]).exp_()  # (B, H, t, S)
        grad_v, grad_logits = attention_backward(probs, v, out, grad_out)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = grad_logits.sum(0).sum_to_size(bias.shape)

        grad_z = torch.zeros(*q.shape[:-1], table.shape[0], dtype=q.dtype, device=q.device)
        # Unless kept, probs' buffer is free now (and delta's once read).
        upper = torch.mul(grad_logits, weight, out=scratch("cope_upper", probs.shape, q) if kept else probs)
        grad_z.scatter_add_(-1, idx_ceil, upper)
        grad_z.scatter_add_(-1, idx_floor, torch.sub(grad_logits, upper, out=upper))
        # dg_it = sum_{j<=t} dp_ij, then * g (1 - g) = x g - (x g) g; g = 0 in the future
        grad_gates = torch.mul(delta, grad_logits, out=upper if kept else delta).cumsum_(-1)
        grad_gates.mul_(gates)
        grad_gates.addcmul_(grad_gates, gates, value=-1.0)
        grad_scores = grad_logits.add_(grad_gates).mul_(scale)  # dA, scaled for the q.k product

        grad_q = torch.matmul(grad_scores, k).add_(torch.matmul(grad_z, table), alpha=scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        grad_table = torch.einsum("bhtp,bhtd->pd", grad_z, q).mul_(scale)
        return grad_q, grad_k, grad_v, grad_table, grad_bias, None, None, None


def saved_bytes_per_entry(element_size: int) -> int:
    """Bytes a block keeps per (batch, head, query, key) when it saves instead of recomputing:
    probabilities, gates, interpolation weights and differences, and the two int64 indices."""
    return 4 * element_size + 2 * 8


def cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    npos_max: int,
    save_bytes: int = 0,
) -> Tensor:
    """Fused CoPE attention: q (B, H, t, Dh), k and v (B, H, S, Dh), table (P, Dh), bias (H, t, S) or
    None, keep (t, S) boolean visibility (None: all visible). Returns (B, H, t, Dh).
    ``save_bytes``: how much the forward may keep for backward instead of recomputing the block."""
    table = table.to(q.dtype)
    if needs_autograd(q, k, v, table, bias):
        save = q.shape[:-1].numel() * k.shape[2] * saved_bytes_per_entry(q.element_size()) <= save_bytes
        return CoPEAttentionFn.apply(q, k, v, table, bias, keep, npos_max, save)
    # Inference (e.g. each step of cached decoding): the same forward, without autograd's bookkeeping.
    logits, *_ = _forward_block(q, k, v, table, bias, keep, npos_max)
    return torch.matmul(row_softmax_(logits, need_lse=False)[0], v)
