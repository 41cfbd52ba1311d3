"""Attention with an additive position bias (ALiBi, Kerple, T5, FIRE, Sandwich): SDPA's fast kernel
forward, and a backward that also returns the bias gradient.

``F.scaled_dot_product_attention`` on CPU (torch 2.13) takes its fused flash kernel for a float mask
of 2 or 4 dimensions, but falls back to the math path (the (B, H, T, S) logits and probabilities
materialised, several times over) for a 3-dimensional (H, T, S) mask, and for any mask that requires
a gradient, i.e. whenever the bias has learnable parameters (Kerple, T5, FIRE). ``bias_attention``
hands the bias to the flash kernel as a 4-dimensional mask; when a gradient is needed it runs the
flash forward (which also returns each row's log-sum-exp) and its own backward, query block by
query block (docs/attention.md):

    P = exp(q k^T / sqrt(Dh) + mask - lse)            recomputed, (B, H, t, S) per block
    dV += P^T dO;   dS = P * (dO V^T - rowsum(dO * O));   dQ = dS K / sqrt(Dh);   dK += dS^T Q / sqrt(Dh)
    dmask = sum over the batch of dS

A causal block stops at the last key its queries can see (``causal_start``), so the backward skips
the hidden half as SDPA's causal kernel does; its temporaries live in reused ``common.scratch``
buffers. On one thread this backward is faster than the flash kernel's own (B 8, H 4, T 512, Dh 32;
docs/attention-paths.md), so it also runs when only q, k and v need gradients (ALiBi, Sandwich).
The ops are torch custom ops: opaque to torch.compile, the same functions in eager mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.kernels.common import attention_backward, needs_autograd, scratch

# A backward block's (B, H, t, S) temporaries hold about this many elements (4 MiB in float32): with
# 2**19 the fastest of 2**18 .. 2**22 on one core of an AMD EPYC (B 8, H 4, T 512, Dh 32; 2**22 took
# 1.3x as long).
BACKWARD_ELEMENTS = 2**20


def backward_block_size(batch: int, heads: int, n_queries: int, n_keys: int) -> int:
    """Query rows per backward block: the largest power of two t (at least 16, at most T) with
    batch * heads * t * n_keys <= BACKWARD_ELEMENTS."""
    t = max(1, BACKWARD_ELEMENTS // max(1, batch * heads * n_keys))
    return min(n_queries, max(16, 1 << (t.bit_length() - 1)))


@torch.library.custom_op("poslab::bias_attention", mutates_args=())
def bias_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal_start: int | None
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(Dh) + mask) @ v and the rows' log-sum-exp (B, H, T), through SDPA's CPU
    flash kernel; ``mask`` (1, H or 1, T, S) holds the bias and -inf where a key is hidden.
    ``causal_start`` is for the backward (`bias_attention_backward`)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
    return out.contiguous(), lse.contiguous()  # the layouts the fake declares


@bias_attention_forward.register_fake
def _(q, k, v, mask, causal_start):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])


@torch.library.custom_op("poslab::bias_attention_backward", mutates_args=())
def bias_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    out: Tensor,
    lse: Tensor,
    causal_start: int | None,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, mask) of ``bias_attention_forward`` (the mask's gradient summed over the batch,
    empty unless ``mask_grad``). ``causal_start``: query row r sees no key after causal_start + r
    (the first query's position, in a causal attention with consecutive queries), so each block
    stops there; None: every block reads every key (the mask alone hides them)."""
    n_batch, n_heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad_out = grad_out.contiguous()
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
    grad_mask = torch.zeros_like(mask) if mask_grad else mask.new_empty(0)
    block = backward_block_size(n_batch, n_heads, n_queries, n_keys)
    # torch's exp takes a slow path (30-100x on this AVX-512 CPU) for arguments whose result is
    # below the smallest normal number, which a distance bias and the mask's -inf give most keys:
    # clamped just above, a hidden or negligible key gets a probability of 3e-38 (float32) or
    # 6e-308 (float64) instead of 0 or less.
    floor = math.log(torch.finfo(q.dtype).tiny) + 1.0
    for r0 in range(0, n_queries, block):
        r1 = min(n_queries, r0 + block)
        end = n_keys if causal_start is None else min(n_keys, max(1, causal_start + r1))
        qb, kb, vb = q[:, :, r0:r1], k[:, :, :end], v[:, :, :end]
        probs = scratch("bias_probs", (n_batch, n_heads, r1 - r0, end), q)
        torch.matmul(qb, kb.transpose(-1, -2), out=probs)
        probs.mul_(scale).add_(mask[:, :, r0:r1, :end]).sub_(lse[:, :, r0:r1, None])
        probs.clamp_(min=floor).exp_()
        grad_vb, grad_logits = attention_backward(probs, vb, out[:, :, r0:r1], grad_out[:, :, r0:r1])
        grad_v[:, :, :end] += grad_vb
        if mask_grad:  # the mask is the same for every sequence (and, with one mask head, every head)
            summed = grad_logits.sum(0, keepdim=True)  # (1, H, t, end)
            grad_mask[:, :, r0:r1, :end] = summed.sum_to_size(1, mask.shape[1], r1 - r0, end)
        grad_logits.mul_(scale)  # now dL/d(q k^T)
        grad_q[:, :, r0:r1] = torch.matmul(grad_logits, kb)
        grad_k[:, :, :end] += torch.matmul(grad_logits.transpose(-1, -2), qb)
    return grad_q, grad_k, grad_v, grad_mask


@bias_attention_backward.register_fake
def _(grad_out, q, k, v, mask, out, lse, causal_start, mask_grad):
    grads = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v)]
    return *grads, torch.empty_like(mask) if mask_grad else mask.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, causal_start = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.causal_start = causal_start


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    mask_grad = ctx.needs_input_grad[3]
    grads = bias_attention_backward(grad_out, q, k, v, mask, out, lse, ctx.causal_start, mask_grad)
    return *grads[:3], grads[3] if mask_grad else None, None


torch.library.register_autograd("poslab::bias_attention", _backward, setup_context=_setup_context)


def bias_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, keep: Tensor | None, *, causal_start: int | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + bias, keys hidden where ``keep`` is False) @ v.

    q (B, H, T, Dh), k and v (B, H, S, Dh), bias (H, T, S) or broadcastable to it (may require a
    gradient), keep (T, S) boolean or None (every key visible). ``causal_start``: see
    `bias_attention_backward`; only a hint for speed.
    """
    bias = bias.to(q.dtype)
    mask = bias if keep is None else torch.where(keep, bias, float("-inf"))
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # 4-D: SDPA's flash kernel takes it
    fits = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and mask.shape[0] == 1
    if not (fits and needs_autograd(q, k, v, mask)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask.shape[-2:] != (q.shape[2], k.shape[2]):  # a bias broadcast over queries or keys
        mask = mask.expand(1, mask.shape[1], q.shape[2], k.shape[2])
    return bias_attention_forward(q, k, v, mask.contiguous(), causal_start)[0]
