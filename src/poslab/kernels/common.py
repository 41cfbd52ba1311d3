"""Pieces the CoPE and DAPE block kernels share."""

from __future__ import annotations

import torch
from torch import Tensor


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a kernel call must record a graph: gradients are on and some input requires them.
    Otherwise (inference, e.g. a cached decoding step) the kernels skip ``autograd.Function``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def row_softmax_(logits: Tensor, *, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Softmax over the last axis. With ``need_lse`` it works in ``logits``' buffer and also returns
    the row log-sum-exp, which lets a backward turn recomputed logits into the same probabilities;
    without, one fused softmax into a new tensor."""
    if not need_lse:
        return torch.softmax(logits, dim=-1), None
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return logits.sub_(lse).exp_(), lse


def attention_backward(probs: Tensor, v: Tensor, out: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of out = probs @ v, probs = softmax(logits): (dL/dv, dL/dlogits).

    dL/dlogits = probs * (grad_out v^T - rowsum(grad_out * out)), in a fresh tensor, never probs'
    buffer (probs may be saved for a second backward).
    """
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    row = (grad_out * out).sum(-1, keepdim=True)  # (B, H, t, 1)
    return grad_v, torch.matmul(grad_out, v.transpose(-1, -2)).sub_(row).mul_(probs)
