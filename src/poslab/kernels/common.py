"""Pieces the CoPE and DAPE block kernels share."""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A buffer of ``shape`` (contents undefined) for a temporary that dies before the kernel returns,
    reused across blocks and calls: one per name, dtype and device, per thread, grown as needed.

    On CPU a fresh (B, H, t, S) tensor per block costs page faults unless the process has tuned
    glibc's allocator (``poslab.tune_allocator``, which the command line applies); with
    reused buffers a library user's process is as fast as the CLI. Never for a tensor that is
    returned or saved for backward. CUDA has a caching allocator: there this is ``torch.empty``.
    """
    dtype = dtype or like.dtype
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=like.device)
    pool = _scratch.__dict__.setdefault("pool", {})
    numel = math.prod(shape)
    # Tensors made in inference mode cannot be written outside it: one set of buffers per mode.
    key = (name, dtype, torch.is_inference_mode_enabled())
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they hold the largest block's temporaries until then)."""
    _scratch.__dict__.pop("pool", None)


def hidden_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``keep``, -inf elsewhere, as a float tensor of ``keep``'s shape: ``x + hidden_mask(keep)``
    is ``x.masked_fill(~keep, -inf)`` for an x without +inf (the logits), and on CPU some 30 times
    faster where keep is broadcast over a block's batch and heads: torch's masked_fill is not
    vectorised there (one thread, a (4, 4, 64, 4096) float32 block: 21 ms against 0.6 ms)."""
    return keep.to(dtype).log_()


def hide_(x: Tensor, keep: Tensor) -> Tensor:
    """``x.masked_fill_(~keep, -inf)`` as an in-place add of `hidden_mask` (x must hold no +inf)."""
    return x.add_(hidden_mask(keep, x.dtype))


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a kernel call must record a graph: gradients are on and some input requires them.
    Otherwise (inference, e.g. a cached decoding step) the kernels skip ``autograd.Function``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def exp_normal_(x: Tensor) -> Tensor:
    """exp(x) in place, 0 where it would be below e^2 times the dtype's smallest normal number
    (and at -inf); x must hold no nan. Torch's CPU exp takes a slow path for arguments whose result
    underflows and for -inf, which masked and sharp attention logits are full of: 10-20 times
    slower on this AVX-512 CPU (and ``torch.logsumexp`` with it: 32 ms against 3 ms for a sharp
    (8, 4, 64, 512) block). So exp sees nothing below the floor, and what the floor gave is zeroed."""
    floor = math.log(torch.finfo(x.dtype).tiny) + 2.0
    x = x.clamp_(min=floor).exp_()
    return torch.nn.functional.threshold_(x, math.exp(floor) * (1 + 1e-4), 0.0)


def row_softmax_(logits: Tensor, *, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Softmax over the last axis. With ``need_lse`` it works in ``logits``' buffer and also returns
    the row log-sum-exp, which lets a backward turn recomputed logits into the same probabilities
    (`exp_normal_` of logits - lse); without, one fused softmax into a new tensor. Every row needs a
    finite logit (a visible key)."""
    if not need_lse:
        return torch.softmax(logits, dim=-1), None
    top = logits.amax(-1, keepdim=True)
    probs = exp_normal_(logits.sub_(top))  # no logsumexp: its exp underflows as slowly
    total = probs.sum(-1, keepdim=True)
    return probs.div_(total), top.add_(total.log_())


def attention_backward(probs: Tensor, v: Tensor, out: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of out = probs @ v, probs = softmax(logits): (dL/dv, dL/dlogits).

    dL/dlogits = probs * (grad_out v^T - rowsum(grad_out * out)), in the 'grad_logits' scratch
    buffer, never probs' (probs may be saved for a second backward): the caller must be done with it
    before the next block's backward.
    """
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    row = (grad_out * out).sum(-1, keepdim=True)  # (B, H, t, 1)
    grad_logits = scratch("grad_logits", probs.shape, probs)
    torch.matmul(grad_out, v.transpose(-1, -2), out=grad_logits)
    return grad_v, grad_logits.sub_(row).mul_(probs)
