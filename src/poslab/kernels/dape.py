"""Fused DAPE attention (pointwise MLP, kernel_size 1) for one block of queries, hand-written backward.

logits = A + [B] + W2 leaky(W1a A + W1b B + b1) + b2 (DESIGN.md section 4), then mask, softmax and
the value product. The MLP runs channel-first as small matrix products over (B, C, t*S), so no
(B, t, S, C) permutes are made; W1b B + b1 depends on positions only and is computed once per block,
not per batch element. Forward keeps only the output and the row log-sum-exp; backward recomputes
the block. The hidden map is D/H times the size of the scores, so blocks should be smaller than for
plain attention (the caller sizes them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _forward_block(q, k, bias, keep, w1, b1, w2, b2, add_base):
    """Scores A, hidden map (after LeakyReLU) and final logits, (B, C, t, S) each."""
    n_batch, n_heads, t, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, t, S)
    s = scores.shape[-1]
    flat = scores.view(n_batch, n_heads, t * s)
    hidden = torch.matmul(w1[:, :n_heads], flat)  # (B, D, t*S)
    if bias is None:
        hidden.add_(b1[:, None])
    else:
        hidden.add_(torch.addmm(b1[:, None], w1[:, n_heads:], bias.reshape(n_heads, t * s)))
    F.leaky_relu_(hidden, 0.01)
    logits = torch.matmul(w2, hidden).add_(b2[:, None]).add_(flat)  # (B, H, t*S)
    logits = logits.view(n_batch, n_heads, t, s)
    if add_base and bias is not None:
        logits.add_(bias)
    if keep is not None:
        logits.masked_fill_(~keep, float("-inf"))
    return scores, hidden, logits


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
        scores, hidden, logits = _forward_block(q, k, bias, keep, w1, b1, w2, b2, ctx.add_base)
        s = scores.shape[-1]
        probs = logits.sub_(lse).exp_()
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        row = (grad_out * out).sum(-1, keepdim=True)
        grad_logits = torch.matmul(grad_out, v.transpose(-1, -2)).sub_(row).mul_(probs)
        flat_grad = grad_logits.view(n_batch, n_heads, t * s)  # (B, H, t*S)

        grad_w2 = torch.matmul(flat_grad, hidden.transpose(-1, -2)).sum(0)  # (H, D)
        grad_b2 = flat_grad.sum((0, 2))
        grad_pre = torch.ops.aten.leaky_relu_backward(
            torch.matmul(w2.t(), flat_grad), hidden, 0.01, True
        )  # (B, D, t*S)
        del hidden
        flat_scores = scores.view(n_batch, n_heads, t * s)
        grad_w1 = torch.zeros_like(w1)
        grad_w1[:, :n_heads] = torch.matmul(grad_pre, flat_scores.transpose(-1, -2)).sum(0)
        grad_b1 = grad_pre.sum((0, 2))
        grad_bias = None
        if bias is not None:
            pre_sum = grad_pre.sum(0)  # (D, t*S): B is the same for every batch element
            grad_w1[:, n_heads:] = torch.matmul(pre_sum, bias.reshape(n_heads, t * s).t())
            if ctx.needs_input_grad[3]:
                grad_bias = torch.matmul(w1[:, n_heads:].t(), pre_sum).view(n_heads, t, s)
                if ctx.add_base:
                    grad_bias.add_(grad_logits.sum(0))
                grad_bias = grad_bias.sum_to_size(bias.shape)
        grad_scores = flat_grad.add_(torch.matmul(w1[:, :n_heads].t(), grad_pre)).mul_(scale)
        grad_scores = grad_scores.view(n_batch, n_heads, t, s)
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
