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

On CPU the per-row elementwise work runs in C++ instead where it can (``NativeCoPEAttentionFn``,
``kernels/cope_rows.cpp`` built by ``poslab.kernels.native``): the matrix products stay in PyTorch
(q k^T, q e^T, dO v^T and the gradients' products), and the kernel goes once over each row for
gates, positions (the same running sum from the row's last key, accumulated in double), the
interpolation and the softmax, and once more in backward, instead of some twenty passes over
(B, H, t, S) tensors and their int64 index copies. It needs each row's visible keys to be a prefix
(causal attention with increasing key positions, or everything visible; ``prefix_lengths``) and
float32/float64 CPU tensors; a bias may have a gradient. Saving for backward costs two floats per
entry (the probabilities and the gates); otherwise the backward recomputes the block from the
scores. By default the kernel is used where a one-off timing against the PyTorch path
(``time_both_paths``, cached beside the library per head size and dtype) found it faster;
``POSLAB_NATIVE=1`` or ``0`` forces either. The PyTorch path above remains for GPUs, other dtypes,
other visibility patterns and machines without a compiler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.kernels import native
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
    pos.nan_to_num_(nan=npos_max - 1)  # a NaN query: a valid table index; its logits stay NaN
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


def _native_probs(q, k, table, bias, row_len, *, keep: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The probabilities, the row lse and (when ``keep``) the gates through ``cope_rows.cpp``. The
    scores A and z live in scratch buffers; the probabilities overwrite A unless ``keep``, which
    makes them and the gates fresh tensors, for backward."""
    shape = (*q.shape[:-1], k.shape[2])
    scores = scratch("cope_scores", shape, q)
    z = _scaled_products(q, k, table, scores)
    probs, gates = (torch.empty(shape, dtype=q.dtype) for _ in range(2)) if keep else (scores, None)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype)
    native.cope_rows_forward(scores, z, bias, row_len, probs=probs, lse=lse, gates=gates)
    return probs, lse, gates


def _scaled_products(q: Tensor, k: Tensor | None, table: Tensor, scores: Tensor | None) -> Tensor:
    """A = q k^T / sqrt(Dh) into ``scores`` (unless None) and z = q e^T / sqrt(Dh), (B, H, t, P), in a
    scratch buffer, returned. The scale goes on q, (t, Dh), not on the (t, S) products."""
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    if scores is not None:
        torch.matmul(q, k.transpose(-1, -2), out=scores)
    return torch.matmul(q, table.t(), out=scratch("cope_z", (*q.shape[:-1], table.shape[0]), q))


class NativeCoPEAttentionFn(torch.autograd.Function):
    """The same function as ``CoPEAttentionFn``, its per-row work in ``cope_rows.cpp``
    (``poslab.kernels.native``); the visible keys of each row are a prefix of length row_len (t,).

    Saving for backward costs two floats per entry, the probabilities and the gates: the backward
    then only sums the positions again from the gates. Without the budget it recomputes the scores A
    with one matrix product and the kernel recomputes gates, positions and probabilities from A, z and
    the row lse."""

    @staticmethod
    def forward(ctx, q, k, v, table, bias, row_len, save):  # noqa: D102
        probs, lse, gates = _native_probs(q, k, table, bias, row_len, keep=save)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, table, bias, row_len, out, *((probs, gates) if save else (lse,)))
        ctx.save = save
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, table, bias, row_len, out, *saved = ctx.saved_tensors
        shape = (*q.shape[:-1], k.shape[2])
        scale = 1.0 / math.sqrt(q.shape[-1])
        grad_out = grad_out.contiguous()
        grad = torch.matmul(grad_out, v.transpose(-1, -2), out=scratch("grad_logits", shape, q))  # dP
        rowdot = (grad_out * out).sum(-1)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = torch.zeros_like(bias)
        if ctx.save:  # the kept probabilities and gates are only read: a second backward may need them
            probs, gates = saved
            z = _scaled_products(q, None, table, None)
            grad_z = torch.empty_like(z)
            native.cope_rows_backward_saved_(
                probs, gates, z, row_len, rowdot, scale=scale, grad=grad, grad_z=grad_z, grad_bias=grad_bias
            )
        else:
            (lse,) = saved
            scores = probs = scratch("cope_scores", shape, q)
            z = _scaled_products(q, k, table, scores)
            grad_z = torch.empty_like(z)
            native.cope_rows_backward_(
                scores, z, bias, row_len, lse, rowdot, scale=scale, probs=probs, grad=grad, grad_z=grad_z,
                grad_bias=grad_bias,
            )  # fmt: skip
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_q = torch.matmul(grad, k).add_(torch.matmul(grad_z, table), alpha=scale)
        grad_k = torch.matmul(grad.transpose(-1, -2), q)
        grad_table = torch.einsum("bhtp,bhtd->pd", grad_z, q).mul_(scale)
        return grad_q, grad_k, grad_v, grad_table, grad_bias, None, None


def prefix_lengths(keep: Tensor | None, t: int, n_keys: int) -> Tensor | None:
    """Keys visible to each query row, (t,) int64, when ``keep`` shows a prefix of every row (causal
    attention with increasing key positions) or is None (all); None for any other pattern."""
    if keep is None:
        return torch.full((t,), n_keys, dtype=torch.int64)
    row_len = keep.sum(-1, dtype=torch.int64)
    prefix = torch.arange(n_keys, device=keep.device) < row_len[:, None]
    return row_len.cpu() if torch.equal(prefix, keep) else None


def uses_native(q: Tensor, *others: Tensor | None) -> bool:
    """Whether ``cope_attention`` runs the row work natively for queries like ``q``: CPU, float32/64,
    the kernel built and switched on, and (unless forced with POSLAB_NATIVE=1) faster than the
    PyTorch path on this machine by the guard's cached timing (per head size and dtype)."""
    if not native.cope_supports(q, *others):
        return False
    if native.mode() == "on":
        return True
    head_dim = q.shape[-1]
    key = f"cope-d{head_dim}-{str(q.dtype).removeprefix('torch.')}"
    return native.decision(key, None, lambda: time_both_paths(head_dim, q.dtype))


def time_both_paths(head_dim: int, dtype: torch.dtype, *, rounds: int = 3) -> dict[str, float]:
    """Seconds (best of ``rounds``, interleaved) of one block's forward and backward on each path,
    at a representative shape: 4 sequences, 4 heads, the last 128 queries of 512 keys, 64 positions
    (at smaller blocks the matrix products and Python overhead both paths share hide the difference)."""
    # Fresh tensors with autograd on, whatever mode the caller is in (e.g. inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        n_batch, n_heads, t, s, npos = 4, 4, 128, 512, 64

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

        q, k, v = (rand(n_batch, n_heads, n, head_dim) for n in (t, s, s))
        table = rand(npos, head_dim)
        keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        row_len = prefix_lengths(keep, t, s)
        grad = torch.randn(n_batch, n_heads, t, head_dim, generator=gen, dtype=dtype)
        runs = {
            "native": lambda: NativeCoPEAttentionFn.apply(q, k, v, table, None, row_len, True),
            "torch": lambda: CoPEAttentionFn.apply(q, k, v, table, None, keep, npos, True),
        }
        return native.best_times(runs, grad, rounds)


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
    if table.shape[0] == npos_max and uses_native(q, k, v, table, bias):  # CPU only: no GPU sync below
        row_len = prefix_lengths(keep, q.shape[2], k.shape[2])
        if row_len is not None:
            return _native_attention(q, k, v, table, bias, row_len, save_bytes)
    if needs_autograd(q, k, v, table, bias):
        save = q.shape[:-1].numel() * k.shape[2] * saved_bytes_per_entry(q.element_size()) <= save_bytes
        return CoPEAttentionFn.apply(q, k, v, table, bias, keep, npos_max, save)
    # Inference (e.g. each step of cached decoding): the same forward, without autograd's bookkeeping.
    logits, *_ = _forward_block(q, k, v, table, bias, keep, npos_max)
    return torch.matmul(row_softmax_(logits, need_lse=False)[0], v)


def _native_attention(q, k, v, table, bias, row_len, save_bytes: int) -> Tensor:
    n_batch, n_heads, t, _ = q.shape
    n_keys = k.shape[2]
    if bias is not None:
        bias = bias.expand(n_heads, t, n_keys).contiguous()  # autograd sums a broadcast's gradient
    table = table.contiguous()
    if needs_autograd(q, k, v, table, bias):
        save = q.shape[:-1].numel() * n_keys * 2 * q.element_size() <= save_bytes
        return NativeCoPEAttentionFn.apply(q, k, v, table, bias, row_len, save)
    probs, _, _ = _native_probs(q, k, table, bias, row_len)
    return torch.matmul(probs, v)
