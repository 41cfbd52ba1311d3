"""Fused DAPE attention (pointwise MLP, kernel_size 1) for one block of queries, hand-written backward.

logits = A + [B] + W2 leaky(W1a A + W1b B + b1) + b2 (DESIGN.md section 4), then mask, softmax and
the value product. The MLP runs channels-last as plain matrix products over (B*t*S, C) rows, so
only H-channel tensors are transposed, never the D-channel hidden map; W1b B + b1 depends on
positions only and is computed once per block, not per batch element. Forward keeps only the
output and the row log-sum-exp; backward recomputes the block. The hidden map is D/H times the
size of the scores, so blocks should be smaller than for plain attention (the caller sizes them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _forward_block(q, k, bias, keep, w1, b1, w2, b2, add_base):
    """Scores A (B, H, t, S), A channels-last (B*t*S, H), hidden map (B*t*S, D), final logits."""
    n_batch, n_heads, t, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, t, S)
    s = scores.shape[-1]
    # Channels-last for the MLP: only H-channel tensors are transposed; the D-channel hidden map
    # comes out of one contiguous matrix product.
    scores_last = scores.permute(0, 2, 3, 1).reshape(n_batch * t * s, n_heads)
    hidden = torch.mm(scores_last, w1[:, :n_heads].t())  # (B*t*S, D)
    if bias is None:
        position_part = b1
    else:  # W1b B + b1 depends on positions only: once per block, broadcast over the batch
        bias_last = bias.permute(1, 2, 0).reshape(t * s, n_heads)
        position_part = torch.addmm(b1, bias_last, w1[:, n_heads:].t())  # (t*S, D)
    hidden.view(n_batch, t * s, -1).add_(position_part)
    F.leaky_relu_(hidden, 0.01)
    mixed = torch.addmm(b2, hidden, w2.t())  # (B*t*S, H)
    logits = scores.clone().add_(mixed.view(n_batch, t, s, n_heads).permute(0, 3, 1, 2))
    if add_base and bias is not None:
        logits.add_(bias)
    if keep is not None:
        logits.masked_fill_(~keep, float("-inf"))
    return scores_last, hidden, logits


class DAPEAttentionFn(torch.autograd.Function):
    """softmax(A + [B] + f([A; B]), causal) @ v for one query block; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, w1, b1, w2, b2, add_base):  # noqa: D102
        _, _, logits = _forward_block(q, k, bias, keep, w1, b1, w2, b2, add_base)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = torch.matmul(logits.sub_(lse).exp_(), v)
        ctx.save_for_backward(q, k, v, bias, keep, w1, b1, w2, b2, out, lse)
        ctx.add_base = add_base
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, bias, keep, w1, b1, w2, b2, out, lse = ctx.saved_tensors
        n_batch, n_heads, t, _ = q.shape
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores_last, hidden, logits = _forward_block(q, k, bias, keep, w1, b1, w2, b2, ctx.add_base)
        s = logits.shape[-1]
        probs = logits.sub_(lse).exp_()
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        row = (grad_out * out).sum(-1, keepdim=True)
        grad_logits = torch.matmul(grad_out, v.transpose(-1, -2)).sub_(row).mul_(probs)  # (B, H, t, S)
        grad_last = grad_logits.permute(0, 2, 3, 1).reshape(n_batch * t * s, n_heads)

        grad_w2 = torch.mm(grad_last.t(), hidden)  # (H, D)
        grad_b2 = grad_last.sum(0)
        grad_pre = torch.ops.aten.leaky_relu_backward(torch.mm(grad_last, w2), hidden, 0.01, True)
        del hidden  # (B*t*S, D)
        grad_w1 = torch.zeros_like(w1)
        # (H, N) @ (N, D) then transpose: BLAS is far slower reducing as (D, N) @ (N, H).
        grad_w1[:, :n_heads] = torch.mm(scores_last.t(), grad_pre).t()
        grad_b1 = grad_pre.sum(0)
        grad_bias = None
        if bias is not None:
            pre_sum = grad_pre.view(n_batch, t * s, -1).sum(0)  # (t*S, D): B is shared by the batch
            bias_last = bias.permute(1, 2, 0).reshape(t * s, n_heads)
            grad_w1[:, n_heads:] = torch.mm(bias_last.t(), pre_sum).t()
            if ctx.needs_input_grad[3]:
                grad_bias = torch.mm(pre_sum, w1[:, n_heads:]).view(t, s, n_heads).permute(2, 0, 1)
                if ctx.add_base:
                    grad_bias = grad_bias + grad_logits.sum(0)
                grad_bias = grad_bias.sum_to_size(bias.shape)
        grad_from_mlp = torch.mm(grad_pre, w1[:, :n_heads]).view(n_batch, t, s, n_heads)
        grad_scores = grad_logits.add_(grad_from_mlp.permute(0, 3, 1, 2)).mul_(scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, grad_bias, None, grad_w1, grad_b1, grad_w2, grad_b2, None


def dape_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    mlp: torch.nn.Sequential,
    *,
    add_base: bool,
) -> Tensor:
    """Fused DAPE attention with the pointwise MLP ``mlp`` = (Linear(2H, D), LeakyReLU, Linear(D, H)).

    q (B, H, t, Dh), k and v (B, H, S, Dh), bias (H, t, S) or None (B = 0), keep (t, S) or None.
    """
    lin1, _, lin2 = mlp
    return DAPEAttentionFn.apply(
        q, k, v, bias, keep, lin1.weight, lin1.bias, lin2.weight, lin2.bias, add_base
    )
