"""Attention with a position encoding: one function, a fused path and the eager reference path.

``attend`` applies the encoding's hooks (rotate, bias, logits, input_keys, normalize;
docs/encodings.md), then either calls ``F.scaled_dot_product_attention`` with the bias as a float mask
(when the encoding neither rewrites logits nor replaces the softmax) or runs the eager path, which is
also the executable specification tests compare against.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from poslab.encodings.base import PositionEncoding, causal_mask, consecutive_start
from poslab.kernels.bias import bias_attention, causal_attention
from poslab.kernels.common import hidden_mask

Impl = Literal["auto", "fused", "eager", "triton"]
IMPLS = ("auto", "fused", "eager", "triton")


def default_positions(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """Queries are the last ``n_queries`` of ``n_keys`` positions: S - T + arange(T)."""
    return torch.arange(n_keys - n_queries, n_keys, device=device)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """ValueError unless q (B, H, T, Dh), k (B, H, S, Dh), v (B, H, S, Dv) agree."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attend expects (B, H, T, Dh) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attend: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionEncoding | None = None,
    *,
    causal: bool = True,
    positions: Tensor | None = None,
    impl: Impl = "auto",
    block_size: int | None = None,
    rotated: bool = False,
    extra_keys: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention with a position encoding.

    Args:
        q: queries (B, H, T, Dh).
        k, v: keys and values (B, H, S, Dh); keys sit at positions 0..S-1.
        encoding: a ``PositionEncoding`` (None means NoPE).
        causal: decoder (key j visible to query i iff j <= i) or encoder (all keys visible).
        positions: (T,) integer positions of the queries; default S - T + arange(T), i.e. the queries
            are the last T keys (a full forward when T == S, cached decoding when T < S).
        impl: 'auto' (fused SDPA when the encoding allows it, else the encoding's fused block kernel
            or the eager block path, query block by query block; on CUDA the Triton kernels where the
            encoding has one), 'fused' (SDPA only; raise if the encoding rewrites logits or replaces
            the softmax), 'triton' (the Triton kernels, ``poslab.kernels.triton``; raise if triton is
            missing or the encoding has none), or 'eager' (the reference path: everything
            materialised).
        block_size: queries per block for the blockwise paths; None picks one from the shapes so
            that a block's (B, C, t, S) intermediates stay near ``BLOCK_ELEMENTS``.
        rotated: q and k were already rotated by the encoding's ``rotate`` hook (a KV cache keeps
            rotated keys, so each key is rotated once, not at every decoding step).
        extra_keys: (B, H, S, Dk) what the encoding's ``input_keys`` hook made of the layer input,
            for the encodings that have that hook (CoPE with ``sep_key``, FoX); required for them, else
            unused. For encodings with ``queries_as_extra_keys`` (selective): the queries at every key
            position (rotated like q, i.e. when ``rotated``); q itself when omitted in a full forward.
        document_ids: (B, T) integer ids of packed documents, for a full forward (T == S, default
            positions, not rotated): a document is a run of equal ids within a row; no query sees
            another document's keys, and positions restart at 0 in each document, so every
            document's outputs equal attending to it alone (`packed_attention`).

    Blocks are exact: every query row is independent and sees the keys up to its own position
    (docs/attention.md), so a causal block only computes keys up to the block's end (plus the
    encoding's ``key_lookahead``, for the one form whose rows read a few keys beyond).
    With gradients on, the eager block path recomputes each block in backward (checkpointing), and
    the fused kernels recompute too, except what fits in ``SAVE_BYTES`` per call, so training memory
    is bounded too.

    Returns:
        (B, H, T, Dv) attention outputs.
    """
    check_qkv(q, k, v)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_queries, n_keys = q.shape[2], k.shape[2]
    if n_queries == 0 or n_keys == 0:
        raise ValueError(f"attend needs at least one query and one key, got T={n_queries}, S={n_keys}")
    if encoding is not None and encoding.hooks and encoding.hooks <= {"embed"}:
        # A warning, not an error: the attention is right for a model that embeds the positions
        # itself (the tests run every encoding through attend); alone it is NoPE attention.
        warnings.warn(
            f"encoding {encoding.name!r} acts on the token embeddings (its embed hook), not in "
            "attention, so attend computes NoPE attention: add encoding.embed(x, positions) to the "
            "layer input, and pass encoding=None to attend",
            stacklevel=2,
        )
    if document_ids is not None:
        if (
            rotated
            or n_queries != n_keys
            or not (positions is None or torch.equal(positions.cpu(), torch.arange(n_keys)))
        ):
            raise ValueError(
                "attend: document_ids need a full forward (T == S, default positions, q and k not yet "
                "rotated); decode each document with its own cache"
            )
        return packed_attention(
            q,
            k,
            v,
            encoding,
            document_ids,
            causal=causal,
            impl=impl,
            block_size=block_size,
            extra_keys=extra_keys,
        )
    # first: the position of the first query when the positions are the default consecutive ones, so
    # that what they imply is read from the shapes (no device sync, and torch.compile can trace it).
    first = None
    if positions is None:
        if n_queries > n_keys:
            raise ValueError(f"attend: more queries ({n_queries}) than keys ({n_keys}) needs positions")
        positions, first = default_positions(n_queries, n_keys, q.device), n_keys - n_queries
    elif positions.shape != (n_queries,):
        raise ValueError(f"positions must have shape ({n_queries},), got {tuple(positions.shape)}")
    q_pos, k_pos = positions.to(q.device), torch.arange(n_keys, device=q.device)
    if first == 0:  # a full forward: one tensor, so encodings see at once that q_pos equals k_pos
        k_pos = q_pos

    if encoding is not None:
        encoding.check_mode(causal)
        span = query_span(q_pos, first)  # None while torch.compile traces explicit positions
        encoding.check_length(n_keys - 1 if span is None else max(span[1], n_keys - 1))
        from_queries = "input_keys" in encoding.hooks and encoding.queries_as_extra_keys
        if "rotate" in encoding.hooks and not rotated:
            if from_queries and extra_keys is not None:  # earlier queries, rotated as queries
                extra_keys, _ = encoding.rotate(extra_keys, k, k_pos, k_pos)
            q, k = encoding.rotate(q, k, q_pos, k_pos)
        if from_queries and extra_keys is None and same_positions(q_pos, k_pos, first):
            extra_keys = q  # a full forward: the queries of every key position are q itself
        if "input_keys" not in encoding.hooks:
            extra_keys = None
        elif from_queries and (extra_keys is None or extra_keys.shape != (*k.shape[:3], q.shape[-1])):
            got = None if extra_keys is None else tuple(extra_keys.shape)
            raise ValueError(
                f"encoding {encoding.name!r} reads the queries of earlier positions: attend needs "
                f"extra_keys = the queries at every key position, (B, H, S, Dh) = "
                f"{(*k.shape[:3], q.shape[-1])}, got {got}"
            )
        elif extra_keys is None or extra_keys.shape[:3] != k.shape[:3]:
            got = None if extra_keys is None else tuple(extra_keys.shape)
            raise ValueError(
                f"encoding {encoding.name!r} reads the layer input: attend needs extra_keys = encoding."
                f"input_keys(x) of shape (B, H, S, Dk) with (B, H, S) = {tuple(k.shape[:3])}, got {got}"
            )
    has_bias = encoding is not None and "bias" in encoding.hooks
    rewrites = encoding is not None and (encoding.uses_logits or encoding.replaces_softmax)
    if impl == "fused" and rewrites:
        what = "rewrites logits" if encoding.uses_logits else "replaces the softmax"
        raise ValueError(f"encoding {encoding.name!r} {what}; the fused path cannot run it")

    if impl == "triton" or (impl == "auto" and q.is_cuda and _triton_takes(encoding, causal)):
        from poslab.kernels import triton as triton_kernels

        return triton_kernels.triton_attention(q, k, v, encoding, q_pos, causal=causal, extra_keys=extra_keys)
    if impl == "eager":
        bias = encoding.bias(q_pos, k_pos, causal=causal) if has_bias else None
        return eager_attention(q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys)
    if not rewrites and (not has_bias or q.shape[1] * n_queries * n_keys <= SDPA_BIAS_ELEMENTS):
        bias = position_bias(encoding, q_pos, k_pos, causal=causal, first=first) if has_bias else None
        return fused_attention(q, k, v, bias, q_pos, k_pos, causal=causal, first=first)
    channels = encoding.block_channels(q)
    block = block_size or auto_block_size(q.shape[0], channels, n_queries, n_keys)
    return blockwise_attention(
        q, k, v, encoding, q_pos, k_pos, causal=causal, block_size=block, extra_keys=extra_keys, first=first
    )


def query_span(q_pos: Tensor, first: int | None) -> tuple[int, int] | None:
    """The lowest and highest query position: from the shape when the queries are known to sit at
    first, first + 1, ... (the default positions), else read from ``q_pos`` (a device sync); None
    while torch.compile traces explicit positions, whose values a trace cannot branch on."""
    if first is not None:
        return first, first + q_pos.shape[0] - 1
    if torch.compiler.is_compiling():
        return None
    low, high = torch.aminmax(q_pos)
    return int(low), int(high)


def same_positions(q_pos: Tensor, k_pos: Tensor, first: int | None) -> bool:
    """Whether the queries are the keys (positions 0..S-1), i.e. a full forward; False while
    torch.compile traces explicit positions (the caller then takes its general path)."""
    if q_pos.shape != k_pos.shape:
        return False
    if first is not None:
        return first == 0
    return not torch.compiler.is_compiling() and bool((q_pos == k_pos).all())


def document_segments(document_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The documents of a packed (B, T) batch, grouped by length: for each length L, ``(rows,
    index)``, rows (n,) the batch row of each document of that length and index (n, L) its token
    indices. A document is a maximal run of equal ids within a row."""
    if document_ids.dim() != 2 or document_ids.is_floating_point() or document_ids.is_complex():
        raise ValueError(
            f"document_ids must be (B, T) integers, got {document_ids.dtype} {tuple(document_ids.shape)}"
        )
    batch, length = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    flat = starts.flatten().nonzero().flatten()  # a row's first token always starts a document
    lengths = torch.diff(flat, append=flat.new_tensor([batch * length]))
    groups = []
    for n in lengths.unique().tolist():
        first = flat[lengths == n]
        index = (first % length)[:, None] + torch.arange(n, device=flat.device)
        groups.append((first // length, index))
    return groups


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionEncoding | None,
    document_ids: Tensor,
    *,
    causal: bool,
    impl: Impl = "auto",
    block_size: int | None = None,
    extra_keys: Tensor | None = None,
) -> Tensor:
    """`attend` over packed documents: each document attends to itself alone, at positions 0..L-1.

    Documents of the same length (across rows) are gathered into one batch and attended together,
    so this is exactly `attend` on each document alone, for every encoding (CoPE's gates and DAPE's
    logits included: they only ever see one document), at one call per distinct document length.
    """
    document_ids = document_ids.to(q.device)
    if document_ids.shape != q.shape[:1] + q.shape[2:3]:
        raise ValueError(
            f"document_ids must have shape (B, T) = {(q.shape[0], q.shape[2])}, got "
            f"{tuple(document_ids.shape)}"
        )
    groups = document_segments(document_ids)
    run = dict(causal=causal, impl=impl, block_size=block_size)
    if len(groups) == 1 and groups[0][1].shape[1] == q.shape[2]:  # one document per row
        return attend(q, k, v, encoding, extra_keys=extra_keys, **run)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    for rows, index in groups:
        take = [
            None if x is None else x[rows[:, None], :, index].transpose(1, 2) for x in (q, k, v, extra_keys)
        ]
        y = attend(*take[:3], encoding, extra_keys=take[3], **run)  # (n, H, L, Dv)
        out[rows[:, None], :, index] = y.transpose(1, 2).to(out.dtype)
    return out


def _triton_takes(encoding: PositionEncoding | None, causal: bool) -> bool:
    """Whether ``impl="auto"`` hands CUDA tensors to a Triton kernel: triton is installed, not switched
    off (POSLAB_TRITON=0), and the encoding has a kernel that SDPA does not already cover (a bias,
    CoPE or DAPE; not NoPE or RoPE)."""
    from poslab.kernels import triton as triton_kernels

    if not triton_kernels.auto_enabled() or triton_kernels.plan(encoding, causal=causal) in (None, "none"):
        return False
    return triton_kernels.available()


# A block's intermediates hold about this many elements (8 MiB in float32): small enough to stay in
# the allocator's heap on CPU and in cache-friendly sizes, large enough to amortise Python overhead.
BLOCK_ELEMENTS = 2**21
# Fused kernels may keep this much of their intermediates for backward instead of recomputing them,
# per attention call, each of its n query blocks up to SAVE_BYTES / n (DAPE: 45 floats per batch,
# query and key at H = 4, D = 32; 256 MiB covers B = 8, T = 512 and recomputes beyond). 0 means
# always recompute; memory stays bounded at any length either way.
SAVE_BYTES = 2**28
# A full (H, T, S) float bias up to this size (64 MiB in float32) is handed to SDPA in one piece;
# larger ones go blockwise (at 2**26 a 4,096-token ALiBi forward added 1.15 GB on CPU).
SDPA_BIAS_ELEMENTS = 2**24


def auto_block_size(batch: int, channels: int, n_queries: int, n_keys: int) -> int:
    """The largest power of two t (at least 16) with batch * channels * t * n_keys <= BLOCK_ELEMENTS."""
    t = max(1, BLOCK_ELEMENTS // max(1, batch * channels * n_keys))
    # Comparisons, not t.bit_length(): torch.compile then guards on ranges of the sizes, not values.
    block = 16
    while block < n_queries and 2 * block <= t:
        block *= 2
    return min(n_queries, block)


def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionEncoding | None,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    block_size: int,
    extra_keys: Tensor | None = None,
    first: int | None = None,
) -> Tensor:
    """Attention query block by query block (q and k already rotated); exact, O(block x S) memory.

    Each block uses, in order of preference: the encoding's fused kernel (``attention_block``),
    SDPA with the block's bias (bias-only encodings), or the eager path, checkpointed when gradients
    are needed so that backward recomputes the block instead of keeping its (t, S) tensors.
    ``first``: the first query's position when the queries are consecutive (see `query_span`).
    """
    has_bias = encoding is not None and "bias" in encoding.hooks
    rewrites = encoding is not None and (encoding.uses_logits or encoding.replaces_softmax)
    # Contiguous once here, not per block inside every product (q, k, v of a fused projection
    # are strided views).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_blocks, pos_blocks = q.split(block_size, dim=2), q_pos.split(block_size)
    n_keys = k.shape[2]
    ahead = encoding.key_lookahead if encoding is not None else 0
    starts = [None if first is None else first + i * block_size for i in range(len(q_blocks))]
    spans = [query_span(pb, start) for pb, start in zip(pos_blocks, starts, strict=True)]
    # Keys a block needs; all of them while torch.compile traces explicit positions (span None).
    visible = [n_keys if span is None or not causal else min(span[1] + 1 + ahead, n_keys) for span in spans]
    save_bytes = SAVE_BYTES // len(q_blocks) if torch.is_grad_enabled() else 0
    k_blocks, v_blocks = _prefixes(k, visible), _prefixes(v, visible)
    e_blocks = [None] * len(visible) if extra_keys is None else _prefixes(extra_keys, visible)
    contexts = [None] * len(visible)
    if rewrites and all(span is not None for span in spans):
        made = encoding.block_context(q, k, extra_keys, spans, k_pos, causal=causal)
        contexts = contexts if made is None else made
    outputs = []
    blocks = zip(
        q_blocks, pos_blocks, k_blocks, v_blocks, e_blocks, visible, spans, starts, contexts, strict=True
    )
    for qb, pb, kb, vb, eb, n_visible, span, start, cb in blocks:
        kpb = k_pos[:n_visible]
        bias = position_bias(encoding, pb, kpb, causal=causal, first=start) if has_bias else None
        if bias is not None:
            bias = bias.to(q.dtype)
        if not rewrites:
            outputs.append(fused_attention(qb, kb, vb, bias, pb, kpb, causal=causal, first=start))
            continue
        # keep: the causal visibility, None when every query of the block sees every key.
        keep = causal_mask(pb, kpb) if causal and (span is None or span[0] < n_visible - 1) else None
        extra = {} if eb is None else {"extra_keys": eb}  # only encodings with an input_keys hook
        if cb is not None:  # only encodings with a block_context
            extra["context"] = cb
        out = encoding.attention_block(
            qb, kb, vb, bias, pb, kpb, keep, causal=causal, save_bytes=save_bytes, **extra
        )
        if out is None:
            args = (qb, kb, vb, encoding, bias, pb, kpb)
            if torch.is_grad_enabled() and q.shape[2] > block_size:
                out = checkpoint(_eager_block, *args, causal, eb, cb, use_reentrant=False)
            else:
                out = eager_attention(*args, causal=causal, extra_keys=eb, context=cb)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


def _prefixes(x: Tensor, lengths: list[int]) -> tuple[Tensor, ...]:
    """x[:, :, :n] for each n; with gradients, as one node whose backward sums into one buffer
    (slicing block by block would make a zero-filled full-size gradient per block)."""
    if torch.is_grad_enabled() and x.requires_grad and len(lengths) > 1:
        return _Prefixes.apply(x, tuple(lengths))
    return tuple(x[:, :, :n] for n in lengths)


class _Prefixes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lengths):  # noqa: D102
        ctx.lengths, ctx.shape = lengths, x.shape
        return tuple(x[:, :, :n] for n in lengths)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        grad = None
        for n, g in zip(ctx.lengths, grads, strict=True):
            if g is not None:
                if grad is None:
                    grad = g.new_zeros(ctx.shape)
                grad[:, :, :n] += g
        return grad, None


def _eager_block(q, k, v, encoding, bias, q_pos, k_pos, causal, extra_keys, context=None):
    return eager_attention(
        q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys, context=context
    )


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionEncoding | None,
    bias: Tensor | None,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    extra_keys: Tensor | None = None,
    context: Tensor | None = None,
) -> Tensor:
    """The reference path: materialise the logits, let the encoding rewrite them, mask, softmax (or the
    encoding's ``normalize``, which masks itself). ``context``: the block's ``block_context``."""
    _, logits = eager_logits(
        q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys, context=context
    )
    return attention_weights(encoding, logits, q_pos, k_pos, causal=causal).to(v.dtype) @ v  # (B, H, T, Dv)


def eager_logits(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionEncoding | None,
    bias: Tensor | None,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    extra_keys: Tensor | None = None,
    context: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The raw scores A = q.k / sqrt(Dh) and the final pre-mask logits, both (B, H, T, S)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if encoding is not None and encoding.uses_logits:
        extra = {} if extra_keys is None else {"extra_keys": extra_keys}  # only encodings with keys
        if context is not None:  # only encodings with a block_context
            extra["context"] = context
        return scores, encoding.logits(scores, bias, q, k, v, q_pos, k_pos, causal=causal, **extra)
    return scores, scores if bias is None else scores + bias.to(scores.dtype)


def eager_probabilities(logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
    """Softmax over the keys of the (causally masked) logits."""
    if causal:
        logits = logits.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_weights(
    encoding: PositionEncoding | None, logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool
) -> Tensor:
    """The attention weights of the final logits (B, H, T, S): the encoding's ``normalize`` where it
    replaces the softmax (stick-breaking; it masks itself), else the masked softmax."""
    if encoding is not None and encoding.replaces_softmax:
        return encoding.normalize(logits, q_pos, k_pos, causal=causal)
    return eager_probabilities(logits, q_pos, k_pos, causal=causal)


def full_extra_keys(encoding: PositionEncoding, q: Tensor, x: Tensor) -> Tensor | None:
    """The ``extra_keys`` of a full forward over the layer input ``x`` (B, T, D): the (rotated)
    queries ``q`` for an encoding with ``queries_as_extra_keys`` (selective), else what its
    ``input_keys`` hook makes of ``x``; None for an encoding without that hook."""
    if "input_keys" not in encoding.hooks:
        return None
    return q if encoding.queries_as_extra_keys else encoding.input_keys(x)


def position_bias(
    encoding: PositionEncoding, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None = None
) -> Tensor | None:
    """The encoding's bias (H, T, S) for the fast paths: its ``fast_bias`` (the eager path calls
    ``bias``), told where consecutive queries start: ``first`` when the caller knows it, else read
    from q_pos (`consecutive_start`)."""
    first = consecutive_start(q_pos) if first is None else first
    return encoding.fast_bias(q_pos, k_pos, causal=causal, first=first)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    first: int | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with the causal mask, or the bias and the causal mask as one
    float mask (`poslab.kernels.bias.bias_attention`: SDPA's fast kernel, and a backward that skips
    the hidden keys and gives the bias its gradient). ``first``: the first query's position when the
    queries are consecutive (see `query_span`)."""
    n_keys = k.shape[2]
    span = query_span(q_pos, first) if causal else None
    # Every query sees every key, e.g. one decoding step: nothing to mask (keys are 0..S-1).
    sees_all = span is not None and span[0] >= n_keys - 1
    plain_causal = causal and same_positions(q_pos, k_pos, first)
    narrow = q.device.type == "cpu" and v.shape[-1] < q.shape[-1]
    if narrow and bias is None and plain_causal:
        # PoPE's q and k are twice as wide as v: SDPA's CPU flash kernel wants v as wide as q (else
        # it runs the materialising math path, 1.6x slower in PoPE's training step), and would then
        # compute on zero channels in forward and backward; this op keeps v as it is.
        return causal_attention(q, k, v)
    if narrow and bias is None:
        v_wide = F.pad(v, (0, q.shape[-1] - v.shape[-1]))  # zero channels, cut off after
        out = fused_attention(q, k, v_wide, bias, q_pos, k_pos, causal=causal, first=first)
        return out[..., : v.shape[-1]]
    if bias is None and (plain_causal or not causal or sees_all):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and not sees_all)
    keep = causal_mask(q_pos, k_pos) if causal and not sees_all else None
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=hidden_mask(keep, q.dtype))
    start = None if keep is None else first if first is not None else consecutive_start(q_pos)
    return bias_attention(q, k, v, bias, keep, causal_start=start)
