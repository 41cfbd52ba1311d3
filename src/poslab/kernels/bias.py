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

Two more entries share that backward: ``causal_attention`` (no mask: causal attention for PoPE, whose
v is narrower than its doubled q and k; the flash kernel would need v widened with zero channels,
so the forward is blockwise too) and ``table_bias_attention`` (relative PE: the bias read from a small
per-query table, M[t, s] = table[t, index[t, s]], recomputed in backward instead of kept). The ops
are torch custom ops: opaque to torch.compile, the same functions in eager mode.
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


def _narrow_causal_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention (query r sees keys 0..r) and the rows' log-sum-exp, query block by query
    block with the block's logits materialised (blocks as the backward's), for a v narrower than q:
    the flash kernel would need v widened, and its P V product then costs as much as q k^T (PoPE's
    step was 3-7% slower with it on one core). Exponents floored as in the backward."""
    n_batch, n_heads, n_queries, _ = q.shape
    scale = 1.0 / math.sqrt(q.shape[-1])
    floor = math.log(torch.finfo(q.dtype).tiny) + 1.0
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(n_batch, n_heads, n_queries, v.shape[-1])
    lse = q.new_empty(n_batch, n_heads, n_queries)
    block = backward_block_size(n_batch, n_heads, n_queries, k.shape[2])
    for r0 in range(0, n_queries, block):
        r1 = min(n_queries, r0 + block)
        logits = scratch("causal_logits", (n_batch, n_heads, r1 - r0, r1), q)
        torch.matmul(q[:, :, r0:r1], k[:, :, :r1].transpose(-1, -2), out=logits)
        logits.mul_(scale)
        _hide_future(logits, r0, r1)
        top = logits.amax(-1, keepdim=True)
        logits.sub_(top).clamp_(min=floor).exp_()
        total = logits.sum(-1, keepdim=True)
        rows = torch.matmul(logits, v[:, :, :r1])
        out[:, :, r0:r1] = rows.div_(total)
        lse[:, :, r0:r1] = top.add_(total.log_()).squeeze(-1)
    return out, lse


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """SDPA's CPU flash kernel: the output and the rows' log-sum-exp. ``mask`` None: causal, query r
    seeing keys 0..r; then a v narrower than q takes `_narrow_causal_forward` instead. Otherwise
    values narrower than q are widened with zero channels for the kernel (which wants them as wide
    as q, else SDPA runs its materialising math path) and cut back after."""
    width = v.shape[-1]
    if width < q.shape[-1] and mask is None:
        return _narrow_causal_forward(q, k, v)
    if width < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - width))
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = kernel(q, k, v, 0.0, mask is None, attn_mask=mask)
    return out[..., :width].contiguous(), lse.contiguous()  # the layouts the fakes declare


def _check_causal_start(mask: Tensor | None, causal_start: int | None) -> None:
    if mask is None and causal_start != 0:
        raise ValueError(f"bias_attention: without a mask the queries start at key 0, got {causal_start}")


@torch.library.custom_op("poslab::bias_attention", mutates_args=())
def bias_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal_start: int | None
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(Dh) + mask) @ v and the rows' log-sum-exp (B, H, T), through SDPA's CPU
    flash kernel; ``mask`` (B or 1, H or 1, T, S) holds the bias and -inf where a key is hidden, or
    is None for plain causal attention (query r sees keys 0..r; ``causal_start`` must be 0). v may
    be narrower than q. ``causal_start`` is for the backward (`bias_attention_backward`)."""
    _check_causal_start(mask, causal_start)
    return _flash(q, k, v, mask)


@bias_attention_forward.register_fake
def _(q, k, v, mask, causal_start):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])


def _blocks_backward(grad_out, q, k, v, out, lse, causal_start, add_logits, take_grad_logits):
    """dL/d(q, k, v) of softmax(q k^T / sqrt(Dh) + M) @ v, query block by query block, M's block
    added by ``add_logits(logits, r0, r1, end)`` (in place, rows r0..r1 and keys 0..end); each block's
    dL/dM handed to ``take_grad_logits(grad_logits, r0, r1, end)`` (a scratch buffer, overwritten
    next block; None: M needs no gradient). ``causal_start``: query row r sees no key after
    causal_start + r, so each block stops there; None: every block reads every key."""
    n_batch, n_heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    # Contiguous once here, not in every block's products (q, k, v of a fused projection are views).
    grad_out, q, k, v = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
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
        add_logits(probs.mul_(scale), r0, r1, end)
        probs.sub_(lse[:, :, r0:r1, None]).clamp_(min=floor).exp_()
        grad_vb, grad_logits = attention_backward(probs, vb, out[:, :, r0:r1], grad_out[:, :, r0:r1])
        grad_v[:, :, :end] += grad_vb
        if take_grad_logits is not None:
            take_grad_logits(grad_logits, r0, r1, end)
        grad_logits.mul_(scale)  # now dL/d(q k^T)
        grad_q[:, :, r0:r1] = torch.matmul(grad_logits, kb)
        grad_k[:, :, :end] += torch.matmul(grad_logits.transpose(-1, -2), qb)
    return grad_q, grad_k, grad_v


def _hide_future(logits: Tensor, first: int, end: int) -> None:
    """-inf at the keys after each query, in place: logits (..., t, end) of queries at positions
    first, first + 1, ... and keys 0..end - 1; only the columns first + 1.. hold any."""
    if end > first + 1:
        # Row r (query first + r), column c (key first + 1 + c) is hidden where c >= r; added as a
        # 0 / -inf matrix, not masked_fill (not vectorised on CPU: `common.hidden_mask`).
        shape = (logits.shape[-2], end - first - 1)
        logits[..., first + 1 : end].add_(
            torch.full(shape, float("-inf"), dtype=logits.dtype, device=logits.device).triu_()
        )


@torch.library.custom_op("poslab::bias_attention_backward", mutates_args=())
def bias_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal_start: int | None,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, mask) of ``bias_attention_forward`` (the mask's gradient summed to its shape,
    i.e. over the batch unless the mask has one per sequence; empty unless ``mask_grad``).
    ``causal_start``: query row r sees no key after causal_start + r (the first query's position,
    in a causal attention with consecutive queries), so each block stops there; None: every block
    reads every key (the mask alone hides them)."""
    _check_causal_start(mask, causal_start)
    if mask is None:
        hide = lambda logits, r0, r1, end: _hide_future(logits, r0, end)  # noqa: E731
        grads = _blocks_backward(grad_out, q, k, v, out, lse, 0, hide, None)
        return *grads, q.new_empty(0)
    grad_mask = torch.zeros_like(mask) if mask_grad else mask.new_empty(0)

    def add_mask(logits, r0, r1, end):
        logits.add_(mask[:, :, r0:r1, :end])

    def take_grad(grad_logits, r0, r1, end):
        shape = (mask.shape[0], mask.shape[1], r1 - r0, end)
        grad_mask[:, :, r0:r1, :end] = grad_logits.sum_to_size(shape)

    grads = _blocks_backward(
        grad_out, q, k, v, out, lse, causal_start, add_mask, take_grad if mask_grad else None
    )
    return *grads, grad_mask


@bias_attention_backward.register_fake
def _(grad_out, q, k, v, mask, out, lse, causal_start, mask_grad):
    grads = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v)]
    return *grads, torch.empty_like(mask) if mask_grad else q.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, causal_start = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is for the backward only
    # No zero-filled gradient for it: the output is the op's only differentiable result, so the
    # backward runs only with a gradient for it (grad_out is never None) and grad_lse is always None.
    ctx.set_materialize_grads(False)
    ctx.causal_start = causal_start


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    mask_grad = ctx.needs_input_grad[3]
    grads = bias_attention_backward(grad_out, q, k, v, mask, out, lse, ctx.causal_start, mask_grad)
    return *grads[:3], grads[3] if mask_grad else None, None


torch.library.register_autograd("poslab::bias_attention", _backward, setup_context=_setup_context)


def _with_hidden_column(table: Tensor) -> Tensor:
    """``table`` (B, H, T, R) and a last column of -inf, the value of index R (a hidden key)."""
    return torch.cat((table, table.new_full((*table.shape[:-1], 1), float("-inf"))), dim=-1)


def _gathered(table: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """table[b, h, t, index[t, s]], (B, H, T, S); table with its -inf column (`_with_hidden_column`)."""
    return torch.gather(table, -1, index.expand(*table.shape[:2], *index.shape), out=out)


def _capped_distances(table: Tensor, first: int, n_keys: int, buffer: str | None = None) -> Tensor:
    """table[b, h, t, min(first + t - s, R - 1)] for keys s <= first + t, -inf after: (B, H, t, S).

    The causal Toeplitz layout of a bias capped at distance R - 1, without a gather: the capped
    entry fills each row, then the R - 1 nearer distances are written along their diagonals through
    one strided view. Rows are R - 1 entries wider on the left, so that the diagonals of the first
    rows (distances before key 0) land in that margin instead of another row. ``buffer``: a
    `scratch` name (the result is a view of it), else a new tensor.
    """
    n_batch, n_heads, n_rows, width = table.shape
    cap = width - 1
    shape = (n_batch, n_heads, n_rows, n_keys + cap)
    padded = table.new_empty(shape) if buffer is None else scratch(buffer, shape, table)
    padded.copy_(table[..., cap:].expand(shape))
    if cap:
        row = shape[-1]
        # entry (t, d') of the view is row t, key first + t - (cap - 1 - d'), i.e. distance cap - 1 - d'
        strides = (n_heads * n_rows * row, n_rows * row, row + 1, 1)
        near = padded.as_strided(
            (n_batch, n_heads, n_rows, cap), strides, padded.storage_offset() + first + 1
        )
        near.copy_(table[..., :cap].flip(-1))
    bias = padded[..., cap:]
    _hide_future(bias, first, n_keys)
    return bias


def _table_bias(table: Tensor, index: Tensor | None, first: int | None, n_keys: int, buffer=None) -> Tensor:
    if index is None:
        return _capped_distances(table, first, n_keys, buffer)
    out = None if buffer is None else scratch(buffer, (*table.shape[:3], index.shape[-1]), table)
    return _gathered(_with_hidden_column(table), index, out=out)


def _check_table_index(index: Tensor | None, causal_start: int | None, n_queries: int, n_keys: int) -> None:
    if index is None and (causal_start is None or causal_start + n_queries > n_keys):
        raise ValueError(
            f"table_bias_attention: without an index the queries sit at causal_start, causal_start + 1, "
            f"... among the keys, got causal_start {causal_start} for {n_queries} queries and {n_keys} keys"
        )


@torch.library.custom_op("poslab::table_bias_attention", mutates_args=())
def table_bias_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor | None, causal_start: int | None
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(Dh) + M) @ v and the rows' log-sum-exp, through SDPA's CPU flash kernel:
    M[b, h, t, s] = table[b, h, t, index[t, s]], -inf where index[t, s] is R (table's width: a
    hidden key); without an index, the causal capped distance (`_capped_distances`) of queries at
    causal_start, causal_start + 1, ..."""
    _check_table_index(index, causal_start, q.shape[2], k.shape[2])
    return _flash(q, k, v, _table_bias(table, index, causal_start, k.shape[2], "table_bias"))


@table_bias_attention_forward.register_fake
def _(q, k, v, table, index, causal_start):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])


@torch.library.custom_op("poslab::table_bias_attention_backward", mutates_args=())
def table_bias_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    index: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal_start: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, table) of ``table_bias_attention_forward``: M recomputed block by block from the
    table (no (B, H, T, S) tensor kept), its gradient summed into the table's entries."""
    _check_table_index(index, causal_start, q.shape[2], k.shape[2])
    if index is None:
        grad_table = torch.empty_like(table, memory_format=torch.contiguous_format)
        source, cap = table, table.shape[-1] - 1
    else:
        source = _with_hidden_column(table)
        grad_table = torch.zeros_like(source)

    def add_bias(logits, r0, r1, end):
        if index is None:
            logits.add_(_capped_distances(source[:, :, r0:r1], causal_start + r0, end, "table_bias"))
        else:
            logits.add_(
                _gathered(
                    source[:, :, r0:r1], index[r0:r1, :end], out=scratch("table_bias", logits.shape, logits)
                )
            )

    def take_grad(grad_logits, r0, r1, end):
        if index is not None:
            where = index[r0:r1, :end].expand(*grad_logits.shape)
            grad_table[:, :, r0:r1].scatter_add_(-1, where, grad_logits)
            return
        # distance d < cap: the one key first + t - d (none before key 0); the cap: every other
        # key, i.e. the row's sum less the near ones (hidden keys have no gradient to speak of)
        keys = torch.arange(causal_start + r0, causal_start + r1, device=q.device)[:, None]
        keys = keys - torch.arange(cap, device=q.device)
        near = torch.gather(grad_logits, -1, keys.clamp(min=0).expand(*grad_logits.shape[:2], *keys.shape))
        near.mul_(keys >= 0)
        grad_table[:, :, r0:r1, :cap] = near
        grad_table[:, :, r0:r1, cap] = grad_logits.sum(-1) - near.sum(-1)

    grads = _blocks_backward(grad_out, q, k, v, out, lse, causal_start, add_bias, take_grad)
    return *grads, grad_table if index is None else grad_table[..., :-1].contiguous()


@table_bias_attention_backward.register_fake
def _(grad_out, q, k, v, table, index, out, lse, causal_start):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, table))


def _table_setup_context(ctx, inputs, output) -> None:
    q, k, v, table, index, causal_start = inputs
    ctx.save_for_backward(q, k, v, table, index, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.causal_start = causal_start


def _table_backward(ctx, grad_out, grad_lse):
    q, k, v, table, index, out, lse = ctx.saved_tensors
    grads = table_bias_attention_backward(grad_out, q, k, v, table, index, out, lse, ctx.causal_start)
    return *grads, None, None


torch.library.register_autograd(
    "poslab::table_bias_attention", _table_backward, setup_context=_table_setup_context
)


def table_bias_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, index: Tensor | None, *, causal_start: int | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + M) @ v, the bias M read from a small per-query table.

    q (B, H, T, Dh), k (B, H, S, Dh), v (B, H, S, Dv) with Dv <= Dh, table (B, H, T, R) (may require
    a gradient). M[b, h, t, s] = table[b, h, t, index[t, s]], index (T, S) integers in 0..R, R
    marking a hidden key; or, with index None, causal attention of queries at positions
    causal_start, causal_start + 1, ... (keys 0..S-1) with M = table[..., min(i - j, R - 1)]. The
    (B, H, T, S) bias is never kept for backward, only the table (Shaw-style relative position
    embeddings: q_t . r_n for R distances n). ``causal_start`` with an index: see
    `bias_attention_backward`.
    """
    table = table.to(q.dtype)
    _check_table_index(index, causal_start, q.shape[2], k.shape[2])
    fits = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
    if not (fits and needs_autograd(q, k, v, table)):
        return bias_attention(q, k, v, _table_bias(table, index, causal_start, k.shape[2]), None)
    return table_bias_attention_forward(q, k, v, table, index, causal_start)[0]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q k^T / sqrt(Dh)) @ v, query r seeing keys 0..r, v possibly narrower than q:
    with gradients, a forward (`_flash`: SDPA's flash kernel, or for a narrower v blockwise, without
    widening v) and `bias_attention_backward` without a mask. For PoPE, whose rotation doubles q and
    k but not v."""
    on_cpu = q.device.type == "cpu"
    if not (on_cpu and q.dtype in (torch.float32, torch.float64) and needs_autograd(q, k, v)):
        if on_cpu and v.shape[-1] < q.shape[-1]:  # the flash kernel wants v as wide as q
            wide = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
            return F.scaled_dot_product_attention(q, k, wide, is_causal=True)[..., : v.shape[-1]]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return bias_attention_forward(q, k, v, None, 0)[0]


def bias_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, keep: Tensor | None, *, causal_start: int | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + bias, keys hidden where ``keep`` is False) @ v.

    q (B, H, T, Dh), k (B, H, S, Dh), v (B, H, S, Dv) with Dv <= Dh, bias (H, T, S), (B, H, T, S) or
    broadcastable to either (may require a gradient), keep (T, S) boolean or None (every key
    visible). ``causal_start``: see `bias_attention_backward`; only a hint for speed.
    """
    bias = bias.to(q.dtype)
    mask = bias if keep is None else torch.where(keep, bias, float("-inf"))
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # 4-D: SDPA's flash kernel takes it
    on_cpu = q.device.type == "cpu"
    fits = on_cpu and q.dtype in (torch.float32, torch.float64) and mask.shape[0] in (1, q.shape[0])
    if not (fits and needs_autograd(q, k, v, mask)):
        if on_cpu and v.shape[-1] < q.shape[-1]:  # the flash kernel wants v as wide as q
            wide = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
            return F.scaled_dot_product_attention(q, k, wide, attn_mask=mask)[..., : v.shape[-1]]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask.shape[-2:] != (q.shape[2], k.shape[2]):  # a bias broadcast over queries or keys
        mask = mask.expand(*mask.shape[:2], q.shape[2], k.shape[2])
    return bias_attention_forward(q, k, v, mask.contiguous(), causal_start)[0]
