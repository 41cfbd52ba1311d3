"""Fused DAPE attention (pointwise MLP, kernel_size 1) for one block of queries, hand-written backward.

logits = A + [B] + W2 leaky(W1 [A; B; 1]) + b2 (docs/attention.md, DAPE; the first layer's bias b1 folded
into W1 as a column for a constant 1 feature), then mask, softmax and the value product. The MLP runs
channels-last as plain matrix products over (B*t*S, C) rows: only the few input channels [A; B; 1]
are transposed, never the D-channel hidden map, and one product gives the gradient of W1 and b1.

Memory: the forward keeps the inputs (features), the hidden map and the probabilities for backward
only when the caller allows it (``save_bytes``: they are (2H + 1 + D + H) floats per (batch, query,
key), 45 for H = 4 and D = 32); otherwise it keeps only the output and the row log-sum-exp and the
backward recomputes the block. Recomputing costs about a quarter of the block's time on CPU; the
attention hands each block a share of a per-call budget (``poslab.attention.SAVE_BYTES``), so memory
stays bounded at any length. The hidden map is D/H times the size of the scores, so blocks should
be smaller than for plain attention (the caller sizes them).

On CPU the MLP runs in C++ instead where it can (``dape_mlp_block``, ``poslab.kernels.native``):
the same function with the hidden map kept in registers, so only the scores and the probabilities
(2H floats per entry) are worth saving, and keys a causal row cannot see are skipped. The same
function runs DAPE V2 (arXiv 2410.04798) with kernel_size 3, both convolutions along the keys in C++.
By default the kernel is used where a one-off timing against the other path (``time_both_paths``,
cached beside the library) found it faster; ``POSLAB_NATIVE=1`` or ``0`` forces either. The PyTorch
path above remains for GPUs, other dtypes and machines without a compiler (V2 then takes the eager
path). Per-block temporaries come from ``common.scratch`` buffers, reused across blocks and calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.kernels import native
from poslab.kernels.common import (
    attention_backward,
    exp_normal_,
    hidden_mask,
    needs_autograd,
    row_softmax_,
    scratch,
)

SLOPE = 0.01  # LeakyReLU's negative slope


def _features(scores: Tensor, bias: Tensor | None) -> Tensor:
    """[A; B; 1] channels-last, (B, t, S, C) with C = 2H + 1 (H + 1 without a base bias)."""
    n_batch, n_heads, t, s = scores.shape
    n_feats = n_heads + 1 if bias is None else 2 * n_heads + 1
    feats = torch.empty(n_batch, t, s, n_feats, dtype=scores.dtype, device=scores.device)
    feats[..., :n_heads] = scores.permute(0, 2, 3, 1)
    if bias is not None:
        feats[..., n_heads:-1] = bias.permute(1, 2, 0)  # the same for every batch element
    feats[..., -1] = 1.0
    return feats


def _forward_block(q, k, bias, weight, w2, logit_bias):
    """Features (B, t, S, C), hidden map (B*t*S, D) after the activation, final logits (B, H, t, S).

    ``weight`` is [W1 | b1] (D, C); ``logit_bias`` is b2, plus B when the form adds it, -inf where
    the causal mask hides a key (one pass adds both).
    """
    n_batch, n_heads, t, _ = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))  # (B, H, t, S)
    s = scores.shape[-1]
    feats = _features(scores, bias)
    hidden = torch.mm(feats.view(-1, feats.shape[-1]), weight.t())  # (B*t*S, D), b1 included
    F.leaky_relu_(hidden, SLOPE)
    mixed = torch.mm(hidden, w2.t()).view(n_batch, t, s, n_heads)
    logits = scores.add_(mixed.permute(0, 3, 1, 2)).add_(logit_bias)  # scores' buffer: A is in feats
    return feats, hidden, logits


def _folded(w1: Tensor, b1: Tensor, b2: Tensor, bias: Tensor | None, keep: Tensor | None, add_base: bool):
    """[W1 | b1] and the logit term b2 (+ B when the form adds the base; -inf where ~keep).

    Without a base bias (B = 0, e.g. a RoPE base) W1's B columns are dropped: they see only zeros.
    """
    logit_bias = b2.view(-1, 1, 1)
    if bias is not None and add_base:
        logit_bias = bias + logit_bias
    if keep is not None:
        logit_bias = logit_bias + hidden_mask(keep, logit_bias.dtype)
    if bias is None:
        w1 = w1[:, : b2.shape[0]]
    return torch.cat((w1, b1[:, None]), dim=1), logit_bias


# The block kernels are torch custom ops, as CoPE's (``poslab.kernels.cope``): opaque to
# torch.compile, the same ops in eager mode; each forward returns the output and what its backward
# reads ("saved"), and the backward is an op of its own.


def _dape_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    add_base: bool,
    save: bool,
    train: bool,
) -> tuple[Tensor, list[Tensor]]:
    """softmax(A + [B] + f([A; B]), masked by keep) @ v for one query block (the PyTorch path; see
    the module docstring) and the tensors its backward reads."""
    weight, logit_bias = _folded(w1, b1, b2, bias, keep, add_base)
    if not train:  # inference (e.g. each step of cached decoding): one fused softmax, nothing kept
        _, _, logits = _forward_block(q, k, bias, weight, w2, logit_bias)
        return torch.matmul(row_softmax_(logits, need_lse=False)[0], v), []
    feats, hidden, logits = _forward_block(q, k, bias, weight, w2, logit_bias)
    probs, lse = row_softmax_(logits, need_lse=not save)
    # Either the block's intermediates (backward skips the recomputation) or the row lse.
    return torch.matmul(probs, v), [feats, hidden, probs] if save else [lse]


dape_block = torch.library.custom_op("poslab::dape_block", _dape_block, mutates_args=())


@dape_block.register_fake
def _(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if not train:
        return out, []
    if not save:
        return out, [q.new_empty(*q.shape[:-1], 1)]
    n_batch, n_heads, t, _ = q.shape
    s = k.shape[2]
    n_feats = n_heads + 1 if bias is None else 2 * n_heads + 1
    feats = q.new_empty(n_batch, t, s, n_feats)
    return out, [feats, q.new_empty(n_batch * t * s, w1.shape[0]), q.new_empty(n_batch, n_heads, t, s)]


@torch.library.custom_op("poslab::dape_block_backward", mutates_args=())
def dape_block_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    out: Tensor,
    saved: list[Tensor],
    add_base: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, bias, w1, b1, w2, b2) of ``dape_block``; the bias gradient is empty unless
    ``bias_grad``."""
    n_batch, n_heads, t, _ = q.shape
    weight, logit_bias = _folded(w1, b1, b2, bias, keep, add_base)
    if len(saved) == 3:
        feats, hidden, probs = saved
    else:
        feats, hidden, logits = _forward_block(q, k, bias, weight, w2, logit_bias)
        probs = exp_normal_(logits.sub_(saved[0]))
    s = probs.shape[-1]
    n_rows = n_batch * t * s
    grad_v, grad_logits = attention_backward(probs, v, out, grad_out)  # (B, H, t, S) logits
    grad_last = grad_logits.permute(0, 2, 3, 1).reshape(n_rows, n_heads)

    # Reductions over the rows as (few, N) @ (N, D): BLAS is far slower as (D, N) @ (N, few).
    grad_w2 = torch.mm(grad_last.t(), hidden)  # (H, D)
    grad_b2 = grad_last.sum(0)
    grad_pre = torch.ops.aten.leaky_relu_backward(torch.mm(grad_last, w2), hidden, SLOPE, True)
    del hidden
    grad_weight = torch.mm(feats.view(n_rows, -1).t(), grad_pre).t()  # (D, C): [dW1 | db1]
    # Copies: an op's outputs neither share memory nor differ in layout from its fake's.
    grad_b1 = grad_weight[:, -1].clone(memory_format=torch.contiguous_format)
    grad_w1 = grad_weight[:, :-1].clone(memory_format=torch.contiguous_format)
    if bias is None:  # W1's B columns saw only zeros
        grad_w1 = torch.cat((grad_w1, torch.zeros_like(grad_w1)), dim=1)
    grad_bias = q.new_empty(0)
    # Right operands as transposes of contiguous (few, D) matrices: BLAS takes twice as long
    # with a column slice of W1 as (N, D) @ (D, few).
    if bias is not None and bias_grad:
        w_feats = weight[:, :-1].t().contiguous().t()
        grad_feats = torch.mm(grad_pre, w_feats).view(n_batch, t, s, 2 * n_heads)
        grad_bias = grad_feats[..., n_heads:].sum(0).permute(2, 0, 1)
        if add_base:
            grad_bias = grad_bias + grad_logits.sum(0)
        grad_bias = grad_bias.sum_to_size(bias.shape)
        if grad_bias.shape != (n_heads, t, s):  # a broadcast bias: contiguous, as the fake says
            grad_bias = grad_bias.contiguous()
        grad_from_mlp = grad_feats[..., :n_heads]
    else:
        w_scores = weight[:, :n_heads].t().contiguous().t()
        grad_from_mlp = torch.mm(grad_pre, w_scores).view(n_batch, t, s, n_heads)
    grad_scores = grad_logits.add_(grad_from_mlp.permute(0, 3, 1, 2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    grad_q = torch.matmul(grad_scores, k)
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
    return grad_q, grad_k, grad_v, grad_bias, grad_w1, grad_b1, grad_w2, grad_b2


def _fake_backward(grad_out, q, k, v, bias, keep, w1, b1, w2, b2, out, saved, add_base, bias_grad):
    grad_bias = torch.empty_like(bias) if bias is not None and bias_grad else q.new_empty(0)
    grads = [torch.empty_like(x) for x in (q, k, v, w1, b1, w2, b2)]
    return *grads[:3], grad_bias, *grads[3:]


@dape_block_backward.register_fake
def _(grad_out, q, k, v, bias, keep, w1, b1, w2, b2, out, saved, add_base, bias_grad):
    grads = _fake_backward(grad_out, q, k, v, bias, keep, w1, b1, w2, b2, out, saved, add_base, bias_grad)
    n_batch, n_heads, t, _ = q.shape
    if bias is None or not bias_grad or bias.shape != (n_heads, t, k.shape[2]):
        return grads
    # The bias gradient comes out of the channels-last MLP: (H, t, S) over a (t, S, H) buffer, kept
    # so (a copy would change how the bias encoding's backward sums it, i.e. its rounding).
    grad_bias = q.new_empty(t, k.shape[2], n_heads).permute(2, 0, 1)
    return *grads[:3], grad_bias, *grads[4:]


def _save_context(ctx, inputs, output) -> None:
    """setup_context of the block ops: the tensors q .. b2, the output and the saved list."""
    ctx.save_for_backward(*inputs[:9], output[0], *output[1])
    ctx.mark_non_differentiable(*output[1])
    ctx.set_materialize_grads(False)  # no zero-filled (B, H, t, S) gradients for the saved list
    ctx.add_base = inputs[9]


def _backward(op):
    """The autograd formula of a block op whose backward op is ``op``."""

    def backward(ctx, grad_out, _grad_saved):
        q, k, v, bias, keep, w1, b1, w2, b2, out, *saved = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        grads = op(grad_out, q, k, v, bias, keep, w1, b1, w2, b2, out, saved, ctx.add_base, bias_grad)
        grad_bias = grads[3] if bias_grad else None
        return *grads[:3], grad_bias, None, *grads[4:], None, None, None

    return backward


dape_block.register_autograd(_backward(dape_block_backward), setup_context=_save_context)


def _row_len(keep: Tensor | None, t: int, n_keys: int) -> Tensor:
    """Keys visible to each query row: ``keep`` is causal (a prefix of every row) or None (all)."""
    if keep is None:
        return torch.full((t,), n_keys, dtype=torch.int64)
    return keep.sum(-1, dtype=torch.int64).cpu()


def _native_logits(q, k, bias, row_len, w1, b1, w2, b2, add_base: bool, saved: bool = False):
    """Scores A and final logits (B, H, t, S), -inf where hidden. The logits, and the scores unless
    ``saved`` for backward, are scratch buffers (``common.scratch``)."""
    shape = (*q.shape[:-1], k.shape[2])
    scores = torch.empty(shape, dtype=q.dtype) if saved else scratch("dape_scores", shape, q)
    torch.matmul(q, k.transpose(-1, -2), out=scores).mul_(1.0 / math.sqrt(q.shape[-1]))
    logits = native.dape_mlp_forward(
        scores,
        bias,
        w1,
        b1,
        w2,
        b2,
        row_len,
        slope=SLOPE,
        add_base=add_base,
        out=scratch("dape_logits", shape, q),
    )
    return scores, logits


def _dape_mlp_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    add_base: bool,
    save: bool,
    train: bool,
) -> tuple[Tensor, list[Tensor]]:
    """``dape_block`` with the MLP in ``dape_mlp.cpp`` (``poslab.kernels.native``); the contiguous
    weights as the kernel takes them (V2: w1 (D, C, 3), w2 (H, D, 3)); keep causal or None.

    The hidden map never exists, so saving for backward costs 2H floats per entry (the scores and
    the probabilities), not 3H + 1 + D; without the budget the backward recomputes both.
    """
    row_len = _row_len(keep, q.shape[2], k.shape[2])
    scores, logits = _native_logits(q, k, bias, row_len, w1, b1, w2, b2, add_base, saved=train and save)
    probs, lse = row_softmax_(logits, need_lse=train and not save)
    out = torch.matmul(probs, v)
    if not train:
        return out, []
    return out, [scores, probs] if save else [lse]


dape_mlp_block = torch.library.custom_op("poslab::dape_mlp_block", _dape_mlp_block, mutates_args=())


@dape_mlp_block.register_fake
def _(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if not train:
        return out, []
    if save:
        return out, [q.new_empty(*q.shape[:-1], k.shape[2]) for _ in range(2)]
    return out, [q.new_empty(*q.shape[:-1], 1)]


@torch.library.custom_op("poslab::dape_mlp_block_backward", mutates_args=())
def dape_mlp_block_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    out: Tensor,
    saved: list[Tensor],
    add_base: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dL/d(q, k, v, bias, w1, b1, w2, b2) of ``dape_mlp_block``; the bias gradient is empty unless
    ``bias_grad``."""
    row_len = _row_len(keep, q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1])
    if len(saved) == 2:
        scores, probs = saved
    else:
        scores, logits = _native_logits(q, k, bias, row_len, w1, b1, w2, b2, add_base)
        probs = exp_normal_(logits.sub_(saved[0]))
    grad_out = grad_out.contiguous()
    grad_bias = torch.zeros_like(bias) if bias is not None and bias_grad else None
    if w1.dim() == 2:
        # The kernel does the softmax's backward, the scale, b2's and the base term's gradients as it
        # reads and writes the (B, H, t, S) gradient: four passes over it fewer. In place: grad
        # becomes dL/dscores.
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad = scratch("grad_logits", probs.shape, probs)
        torch.matmul(grad_out, v.transpose(-1, -2), out=grad)  # grad_out v^T
        grad_b2 = torch.empty_like(b2)
        grad_w1, grad_b1, grad_w2 = native.dape_mlp_backward_(
            scores, bias, w1, b1, w2, row_len, grad, grad_bias, slope=SLOPE, probs=probs,
            row=(grad_out * out).sum(-1), scale=scale, base_grad=add_base and grad_bias is not None,
            grad_b2=grad_b2,
        )  # fmt: skip
        grad_scores = grad
    else:  # V2
        grad_v, grad_logits = attention_backward(probs, v, out, grad_out)  # (B, H, t, S) logits
        grad_b2 = grad_logits.sum((0, 2, 3))
        if grad_bias is not None and add_base:
            grad_bias = grad_logits.sum(0)
        # In place: grad_logits becomes dL/dscores.
        grad_w1, grad_b1, grad_w2 = native.dape_mlp_backward_(
            scores, bias, w1, b1, w2, row_len, grad_logits, grad_bias, slope=SLOPE
        )
        grad_scores = grad_logits.mul_(scale)
    grad_q = torch.matmul(grad_scores, k)
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
    grad_bias = q.new_empty(0) if grad_bias is None else grad_bias
    return grad_q, grad_k, grad_v, grad_bias, grad_w1, grad_b1, grad_w2, grad_b2


dape_mlp_block_backward.register_fake(_fake_backward)
dape_mlp_block.register_autograd(_backward(dape_mlp_block_backward), setup_context=_save_context)


def torch_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base: bool, save: bool, train: bool) -> Tensor:
    """One block through the PyTorch-path op (``dape_block``); its output alone."""
    if train or torch.compiler.is_compiling():
        return dape_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train)[0]
    # Eager inference (e.g. a decoding step): the op's function, without the dispatcher's ~30 us.
    return _dape_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train)[0]


def native_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base: bool, save: bool, train: bool) -> Tensor:
    """One block through the native op (``dape_mlp_block``); its output alone."""
    if train or torch.compiler.is_compiling():
        return dape_mlp_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train)[0]
    # Eager inference (e.g. a decoding step): the op's function, without the dispatcher's ~30 us.
    return _dape_mlp_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train)[0]


def v2_eager_block(q, k, v, bias, keep, w1, b1, w2, b2) -> Tensor:
    """DAPE V2 (A + B + f, f two width-k convolutions, features and hidden map masked) as the eager
    path computes it; w1 (D, 2H, k), w2 (H, D, k). The guard's PyTorch side for V2."""
    pad = (0, w1.shape[-1] // 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    feats = torch.cat((scores, bias.expand_as(scores)), dim=1) * keep
    hidden = F.leaky_relu(F.conv2d(feats, w1[:, :, None], b1, padding=pad), SLOPE) * keep
    logits = scores + bias + F.conv2d(hidden, w2[:, :, None], b2, padding=pad)
    return torch.matmul(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1), v)


def saved_floats_per_entry(n_heads: int, width: int, has_bias: bool) -> int:
    """Floats the forward keeps per (batch, query, key) when it saves instead of recomputing."""
    return (2 * n_heads + 1 if has_bias else n_heads + 1) + width + n_heads


def dape_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    mlp: torch.nn.Sequential,
    *,
    add_base: bool,
    save_bytes: int = 0,
) -> Tensor:
    """Fused DAPE attention with the pointwise MLP ``mlp`` = (Linear(2H, D), LeakyReLU, Linear(D, H)).

    q (B, H, t, Dh), k and v (B, H, S, Dh), bias (H, t, S) or None (B = 0), keep (t, S) or None.
    ``save_bytes``: how much the forward may keep for backward instead of recomputing the block.
    """
    lin1, _, lin2 = mlp
    params = (lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    if uses_native(q, mlp) and native.supports(k, v, bias, n_heads=q.shape[1]):
        return _native_attention(q, k, v, bias, keep, params, add_base=add_base, save_bytes=save_bytes)
    if lin1.weight.dim() != 2:
        raise ValueError("dape_attention: V2's convolutions run only in the native kernel (CPU, C++)")
    args = (q, k, v, bias, keep, *params)
    train = needs_autograd(*args)
    n_batch, n_heads, t, _ = q.shape
    per_entry = saved_floats_per_entry(n_heads, lin1.weight.shape[0], bias is not None)
    save = train and n_batch * t * k.shape[2] * per_entry * q.element_size() <= save_bytes
    return torch_block(*args, add_base, save, train)


def uses_native(q: Tensor, mlp: torch.nn.Sequential) -> bool:
    """Whether ``dape_attention`` runs the MLP natively for queries like ``q``: CPU, float32/64, at
    most ``native.MAX_HEADS`` heads, the kernels built and switched on, and (unless forced with
    POSLAB_NATIVE=1) faster than the PyTorch path on this machine by the guard's cached timing."""
    n_heads = q.shape[1]
    if not native.supports(q, *mlp.parameters(), n_heads=n_heads):
        return False
    width, taps = mlp[0].weight.shape[0], mlp[0].weight.shape[-1] if mlp[0].weight.dim() == 4 else 1
    return native.mode() == "on" or _native_wins(n_heads, width, taps, q.dtype)


@torch.compiler.assume_constant_result
def _native_wins(n_heads: int, width: int, taps: int, dtype: torch.dtype) -> bool:
    """The guard's verdict for this MLP and dtype; torch.compile takes it as a constant when it
    traces (it cannot trace the timing or the file the verdict is cached in)."""
    key = f"dape-k{taps}-h{n_heads}-d{width}-{str(dtype).removeprefix('torch.')}"
    return native.decision(key, n_heads, lambda: time_both_paths(n_heads, width, dtype, taps=taps))


def time_both_paths(
    n_heads: int, width: int, dtype: torch.dtype, *, taps: int = 1, rounds: int = 3
) -> dict[str, float]:
    """Seconds (best of ``rounds``, interleaved) of one block's forward and backward on each path,
    at a representative shape: 4 sequences, the last 64 queries of 256 keys, a base bias, 32 dims.
    ``taps`` 3: V2, whose other path is the eager one (``v2_eager_block``)."""
    # Fresh tensors with autograd on, whatever mode the caller is in (e.g. inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        return _time_both_paths(n_heads, width, dtype, taps, rounds)


def _time_both_paths(
    n_heads: int, width: int, dtype: torch.dtype, taps: int, rounds: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    n_batch, t, s, head_dim = 4, 64, 256, 32

    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dtype) * 0.5).requires_grad_()

    q, k, v = (rand(n_batch, n_heads, n, head_dim) for n in (t, s, s))
    bias = rand(n_heads, t, s)
    conv = (taps,) if taps > 1 else ()
    params = (rand(width, 2 * n_heads, *conv), rand(width), rand(n_heads, width, *conv), rand(n_heads))
    keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    grad = torch.randn(n_batch, n_heads, t, head_dim, generator=gen, dtype=dtype)
    runs = {
        "native": lambda: native_block(q, k, v, bias, keep, *params, True, True, True),
        "torch": lambda: torch_block(q, k, v, bias, keep, *params, True, True, True),
    }
    if taps > 1:
        runs["torch"] = lambda: v2_eager_block(q, k, v, bias, keep, *params)
    return native.best_times(runs, grad, rounds)


def _native_attention(q, k, v, bias, keep, params, *, add_base: bool, save_bytes: int) -> Tensor:
    n_batch, n_heads, t, _ = q.shape
    n_keys = k.shape[2]
    if bias is not None:
        bias = bias.expand(n_heads, t, n_keys).contiguous()  # autograd sums a broadcast's gradient
    # q, k and v stay views (a query block, key prefixes): the products read them as they are, and
    # copying them cost more than the products lose.
    w1, b1, w2, b2 = (p.squeeze(2).contiguous() if p.dim() == 4 else p.contiguous() for p in params)
    if bias is None:  # B = 0: W1's B columns see only zeros (autograd gives them a zero gradient)
        w1 = w1[:, :n_heads].contiguous()
    train = needs_autograd(q, k, v, bias, *params)
    save = train and n_batch * t * n_keys * 2 * n_heads * q.element_size() <= save_bytes
    return native_block(q, k, v, bias, keep, w1, b1, w2, b2, add_base, save, train)
