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

On CPU the per-row elementwise work runs in C++ instead where it can (``cope_rows_block``,
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
from poslab.kernels.common import attention_backward, exp_normal_, needs_autograd, row_softmax_, scratch


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


# The block kernels are torch custom ops (``torch.library.custom_op``): opaque to torch.compile, which
# cannot trace their scratch buffers, in-place arithmetic or ctypes calls, and the same ops in eager
# mode. Each forward returns the output and what its backward needs ("saved": the intermediates when
# the block may keep them, else the row lse; nothing for inference, ``train`` False); the backward
# is an op of its own, wired in with ``register_autograd``.


def _cope_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    npos_max: int,
    save: bool,
    train: bool,
) -> tuple[Tensor, list[Tensor]]:
    """softmax(CoPE logits + bias, masked by keep) @ v for one query block (the PyTorch path; see the
    module docstring) and the tensors its backward reads."""
    if not train:  # inference (e.g. each step of cached decoding): one fused softmax, nothing kept
        logits, *_ = _forward_block(q, k, v, table, bias, keep, npos_max)
        return torch.matmul(row_softmax_(logits, need_lse=False)[0], v), []
    logits, *rest = _forward_block(q, k, v, table, bias, keep, npos_max, saved=save)
    probs, lse = row_softmax_(logits, need_lse=not save)
    # Either the block's intermediates (backward skips the recomputation) or the row lse.
    return torch.matmul(probs, v), [probs, *rest] if save else [lse]


cope_block = torch.library.custom_op("poslab::cope_block", _cope_block, mutates_args=())


@cope_block.register_fake
def _(q, k, v, table, bias, keep, npos_max, save, train):
    shape = (*q.shape[:-1], k.shape[2])
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if not train:
        return out, []
    if not save:
        return out, [q.new_empty(*q.shape[:-1], 1)]
    floats = [q.new_empty(shape) for _ in range(4)]  # probs, gates, weight, delta
    return out, [*floats, *(q.new_empty(shape, dtype=torch.int64) for _ in range(2))]


@torch.library.custom_op("poslab::cope_block_backward", mutates_args=())
def cope_block_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    out: Tensor,
    saved: list[Tensor],
    npos_max: int,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, table, bias) of ``cope_block``; the bias gradient is empty unless ``bias_grad``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kept = len(saved) > 1  # saved tensors must stay intact (a second backward may read them)
    if kept:
        probs, gates, weight, delta, idx_floor, idx_ceil = saved
    else:
        logits, *rest = _forward_block(q, k, v, table, bias, keep, npos_max)
        gates, weight, delta, idx_floor, idx_ceil = rest
        probs = exp_normal_(logits.sub_(saved[0]))  # (B, H, t, S)
    grad_v, grad_logits = attention_backward(probs, v, out, grad_out)
    grad_bias = q.new_empty(0)
    if bias is not None and bias_grad:
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
    return grad_q, grad_k, grad_v, grad_table, grad_bias


def _fake_backward(grad_out, q, k, v, table, bias, keep, out, saved, *args):
    """The fake of both backward ops: args are the op's options, ``bias_grad`` last."""
    grad_bias = torch.empty_like(bias) if bias is not None and args[-1] else q.new_empty(0)
    return (*(torch.empty_like(x) for x in (q, k, v, table)), grad_bias)


cope_block_backward.register_fake(_fake_backward)


def _save_context(ctx, inputs, output) -> None:
    """setup_context of the block ops: q, k, v, table, bias, keep, the output and the saved list."""
    ctx.save_for_backward(*inputs[:6], output[0], *output[1])
    ctx.mark_non_differentiable(*output[1])
    # The saved list never gets a gradient: without this, autograd zero-fills a (B, H, t, S) tensor
    # for each of its entries before every backward (5% of CoPE's attention time at T 512).
    ctx.set_materialize_grads(False)
    ctx.args = inputs[6:]  # the non-tensor arguments after keep, save and train last


def _backward(op):
    """The autograd formula of a block op whose backward op is ``op`` (which takes the block op's
    options before save and train, e.g. npos_max, then ``bias_grad``)."""

    def backward(ctx, grad_out, _grad_saved):
        q, k, v, table, bias, keep, out, *saved = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[4]
        grads = op(grad_out, q, k, v, table, bias, keep, out, saved, *ctx.args[:-2], bias_grad)
        return *grads[:4], grads[4] if bias_grad else None, None, *(None for _ in ctx.args)

    return backward


cope_block.register_autograd(_backward(cope_block_backward), setup_context=_save_context)


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


def _cope_rows_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    save: bool,
    train: bool,
) -> tuple[Tensor, list[Tensor]]:
    """``cope_block`` with the per-row work in ``cope_rows.cpp`` (``poslab.kernels.native``); each
    row's visible keys (``keep``) must be a prefix, and the table exactly npos_max rows.

    Saving for backward costs two floats per entry, the probabilities and the gates: the backward
    then only sums the positions again from the gates. Without the budget it recomputes the scores A
    with one matrix product and the kernel recomputes gates, positions and probabilities from A, z and
    the row lse."""
    row_len = _row_lengths(keep, q.shape[2], k.shape[2])
    if not train:
        probs, _, _ = _native_probs(q, k, table, bias, row_len)
        return torch.matmul(probs, v), []
    probs, lse, gates = _native_probs(q, k, table, bias, row_len, keep=save)
    return torch.matmul(probs, v), [probs, gates] if save else [lse]


cope_rows_block = torch.library.custom_op("poslab::cope_rows_block", _cope_rows_block, mutates_args=())


@cope_rows_block.register_fake
def _(q, k, v, table, bias, keep, save, train):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if not train:
        return out, []
    if save:
        return out, [q.new_empty(*q.shape[:-1], k.shape[2]) for _ in range(2)]
    return out, [q.new_empty(q.shape[:-1])]


@torch.library.custom_op("poslab::cope_rows_block_backward", mutates_args=())
def cope_rows_block_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    out: Tensor,
    saved: list[Tensor],
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, table, bias) of ``cope_rows_block``; the bias gradient is empty unless ``bias_grad``."""
    row_len = _row_lengths(keep, q.shape[2], k.shape[2])
    shape = (*q.shape[:-1], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad_out = grad_out.contiguous()
    grad = torch.matmul(grad_out, v.transpose(-1, -2), out=scratch("grad_logits", shape, q))  # dP
    rowdot = (grad_out * out).sum(-1)
    grad_bias = torch.zeros_like(bias) if bias is not None and bias_grad else None
    if len(saved) == 2:  # the kept probabilities and gates are only read: a second backward may need them
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
    return grad_q, grad_k, grad_v, grad_table, q.new_empty(0) if grad_bias is None else grad_bias


cope_rows_block_backward.register_fake(_fake_backward)
cope_rows_block.register_autograd(_backward(cope_rows_block_backward), setup_context=_save_context)


def _row_lengths(keep: Tensor | None, t: int, n_keys: int) -> Tensor:
    """``prefix_lengths``, which the native kernel needs: a ValueError for any other pattern (in
    eager mode ``cope_attention`` sends those to the PyTorch path; a torch.compile trace cannot look)."""
    row_len = prefix_lengths(keep, t, n_keys)
    if row_len is None:
        raise ValueError(
            "native CoPE: every row's visible keys must be a prefix of the keys (causal attention over "
            "keys 0..S-1); run other patterns with POSLAB_NATIVE=0"
        )
    return row_len


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
    return native.mode() == "on" or _native_wins(q.shape[-1], q.dtype)


@torch.compiler.assume_constant_result
def _native_wins(head_dim: int, dtype: torch.dtype) -> bool:
    """The guard's verdict for this head size and dtype; torch.compile takes it as a constant when it
    traces (it cannot trace the timing or the file the verdict is cached in)."""
    key = f"cope-d{head_dim}-{str(dtype).removeprefix('torch.')}"
    return native.decision(key, None, lambda: time_both_paths(head_dim, dtype))


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
        grad = torch.randn(n_batch, n_heads, t, head_dim, generator=gen, dtype=dtype)
        runs = {
            "native": lambda: cope_rows_block(q, k, v, table, None, keep, True, True)[0],
            "torch": lambda: cope_block(q, k, v, table, None, keep, npos, True, True)[0],
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
    # CPU only: no GPU sync in prefix_lengths. A torch.compile trace cannot check that keep shows
    # prefixes; attend's causal masks always do, and the native op raises for any other pattern.
    if (
        table.shape[0] == npos_max
        and uses_native(q, k, v, table, bias)
        and (torch.compiler.is_compiling() or prefix_lengths(keep, q.shape[2], k.shape[2]) is not None)
    ):
        return _native_attention(q, k, v, table, bias, keep, save_bytes)
    train = needs_autograd(q, k, v, table, bias)
    save = train and q.shape[:-1].numel() * k.shape[2] * saved_bytes_per_entry(q.element_size()) <= save_bytes
    return torch_block(q, k, v, table, bias, keep, npos_max, save, train)


def torch_block(q, k, v, table, bias, keep, npos_max: int, save: bool, train: bool) -> Tensor:
    """One block through the PyTorch-path op (``cope_block``); its output alone."""
    if train or torch.compiler.is_compiling():
        return cope_block(q, k, v, table, bias, keep, npos_max, save, train)[0]
    # Eager inference (e.g. a decoding step): the op's function, without the dispatcher's ~30 us.
    return _cope_block(q, k, v, table, bias, keep, npos_max, save, train)[0]


def native_block(q, k, v, table, bias, keep, save: bool, train: bool) -> Tensor:
    """One block through the native op (``cope_rows_block``); its output alone."""
    if train or torch.compiler.is_compiling():
        return cope_rows_block(q, k, v, table, bias, keep, save, train)[0]
    # Eager inference (e.g. a decoding step): the op's function, without the dispatcher's ~30 us.
    return _cope_rows_block(q, k, v, table, bias, keep, save, train)[0]


def _native_attention(q, k, v, table, bias, keep, save_bytes: int) -> Tensor:
    n_batch, n_heads, t, _ = q.shape
    n_keys = k.shape[2]
    if bias is not None:
        bias = bias.expand(n_heads, t, n_keys).contiguous()  # autograd sums a broadcast's gradient
    table = table.contiguous()
    train = needs_autograd(q, k, v, table, bias)
    save = train and q.shape[:-1].numel() * n_keys * 2 * q.element_size() <= save_bytes
    return native_block(q, k, v, table, bias, keep, save, train)
