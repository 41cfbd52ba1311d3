"""Attention with a position encoding: one function, a fused path and the eager reference path.

``attend`` applies the encoding's hooks (rotate, bias, logits, input_keys; docs/encodings.md), then
either calls ``F.scaled_dot_product_attention`` with the bias as a float mask (when the encoding does
not rewrite logits) or runs the eager path, which is also the executable specification tests compare
against.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from poslab.encodings.base import PositionEncoding, causal_mask

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
            encoding has one), 'fused' (SDPA only; raise if the encoding rewrites logits), 'triton'
            (the Triton kernels, ``poslab.kernels.triton``; raise if triton is missing or the encoding
            has none), or 'eager' (the reference path: everything materialised).
        block_size: queries per block for the blockwise paths; None picks one from the shapes so
            that a block's (B, C, t, S) intermediates stay near ``BLOCK_ELEMENTS``.
        rotated: q and k were already rotated by the encoding's ``rotate`` hook (a KV cache keeps
            rotated keys, so each key is rotated once, not at every decoding step).
        extra_keys: (B, H, S, Dk) what the encoding's ``input_keys`` hook made of the layer input,
            for the encodings that have that hook (CoPE with ``sep_key``); required for them, else
            unused.

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
    if positions is None:
        if n_queries > n_keys:
            raise ValueError(f"attend: more queries ({n_queries}) than keys ({n_keys}) needs positions")
        positions = default_positions(n_queries, n_keys, q.device)
    elif positions.shape != (n_queries,):
        raise ValueError(f"positions must have shape ({n_queries},), got {tuple(positions.shape)}")
    q_pos, k_pos = positions.to(q.device), torch.arange(n_keys, device=q.device)

    if encoding is not None:
        encoding.check_mode(causal)
        encoding.check_length(max(int(q_pos.max()), n_keys - 1))
        if "rotate" in encoding.hooks and not rotated:
            q, k = encoding.rotate(q, k, q_pos, k_pos)
        if "input_keys" not in encoding.hooks:
            extra_keys = None
        elif extra_keys is None or extra_keys.shape[:3] != k.shape[:3]:
            got = None if extra_keys is None else tuple(extra_keys.shape)
            raise ValueError(
                f"encoding {encoding.name!r} reads the layer input: attend needs extra_keys = encoding."
                f"input_keys(x) of shape (B, H, S, Dk) with (B, H, S) = {tuple(k.shape[:3])}, got {got}"
            )
    has_bias = encoding is not None and "bias" in encoding.hooks
    rewrites = encoding is not None and encoding.uses_logits
    if impl == "fused" and rewrites:
        raise ValueError(f"encoding {encoding.name!r} rewrites logits; the fused path cannot run it")

    if impl == "triton" or (impl == "auto" and q.is_cuda and _triton_takes(encoding, causal)):
        from poslab.kernels import triton as triton_kernels

        return triton_kernels.triton_attention(q, k, v, encoding, q_pos, causal=causal, extra_keys=extra_keys)
    if impl == "eager":
        bias = encoding.bias(q_pos, k_pos, causal=causal) if has_bias else None
        return eager_attention(q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys)
    if not rewrites and (not has_bias or q.shape[1] * n_queries * n_keys <= SDPA_BIAS_ELEMENTS):
        bias = encoding.bias(q_pos, k_pos, causal=causal) if has_bias else None
        return fused_attention(q, k, v, bias, q_pos, k_pos, causal=causal)
    channels = encoding.block_channels(q)
    block = block_size or auto_block_size(q.shape[0], channels, n_queries, n_keys)
    return blockwise_attention(
        q, k, v, encoding, q_pos, k_pos, causal=causal, block_size=block, extra_keys=extra_keys
    )


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
    return min(n_queries, max(16, 1 << (t.bit_length() - 1)))


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
) -> Tensor:
    """Attention query block by query block (q and k already rotated); exact, O(block x S) memory.

    Each block uses, in order of preference: the encoding's fused kernel (``attention_block``),
    SDPA with the block's bias (bias-only encodings), or the eager path, checkpointed when gradients
    are needed so that backward recomputes the block instead of keeping its (t, S) tensors.
    """
    has_bias = encoding is not None and "bias" in encoding.hooks
    rewrites = encoding is not None and encoding.uses_logits
    # Contiguous once here, not per block inside every product (q, k, v of a fused projection
    # are strided views).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_blocks, pos_blocks = q.split(block_size, dim=2), q_pos.split(block_size)
    n_keys = k.shape[2]
    ahead = encoding.key_lookahead if encoding is not None else 0
    visible = [min(int(pb.max()) + 1 + ahead, n_keys) if causal else n_keys for pb in pos_blocks]
    save_bytes = SAVE_BYTES // len(q_blocks) if torch.is_grad_enabled() else 0
    k_blocks, v_blocks = _prefixes(k, visible), _prefixes(v, visible)
    e_blocks = [None] * len(visible) if extra_keys is None else _prefixes(extra_keys, visible)
    outputs = []
    blocks = zip(q_blocks, pos_blocks, k_blocks, v_blocks, e_blocks, visible, strict=True)
    for qb, pb, kb, vb, eb, n_visible in blocks:
        kpb = k_pos[:n_visible]
        bias = encoding.bias(pb, kpb, causal=causal) if has_bias else None
        if bias is not None:
            bias = bias.to(q.dtype)
        if not rewrites:
            outputs.append(fused_attention(qb, kb, vb, bias, pb, kpb, causal=causal))
            continue
        # keep: the causal visibility, None when every query of the block sees every key.
        keep = causal_mask(pb, kpb) if causal and int(pb.min()) < n_visible - 1 else None
        out = encoding.attention_block(qb, kb, vb, bias, pb, kpb, keep, causal=causal, save_bytes=save_bytes)
        if out is None:
            args = (qb, kb, vb, encoding, bias, pb, kpb)
            if torch.is_grad_enabled() and q.shape[2] > block_size:
                out = checkpoint(_eager_block, *args, causal, eb, use_reentrant=False)
            else:
                out = eager_attention(*args, causal=causal, extra_keys=eb)
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


def _eager_block(q, k, v, encoding, bias, q_pos, k_pos, causal, extra_keys):
    return eager_attention(q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys)


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
) -> Tensor:
    """The reference path: materialise the logits, let the encoding rewrite them, mask, softmax."""
    _, logits = eager_logits(q, k, v, encoding, bias, q_pos, k_pos, causal=causal, extra_keys=extra_keys)
    return eager_probabilities(logits, q_pos, k_pos, causal=causal) @ v  # (B, H, T, Dv)


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
) -> tuple[Tensor, Tensor]:
    """The raw scores A = q.k / sqrt(Dh) and the final pre-mask logits, both (B, H, T, S)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if encoding is not None and encoding.uses_logits:
        extra = {} if extra_keys is None else {"extra_keys": extra_keys}  # only encodings with keys
        return scores, encoding.logits(scores, bias, q, k, v, q_pos, k_pos, causal=causal, **extra)
    return scores, scores if bias is None else scores + bias.to(scores.dtype)


def eager_probabilities(logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
    """Softmax over the keys of the (causally masked) logits."""
    if causal:
        logits = logits.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
    return torch.softmax(logits, dim=-1)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with the bias (and the causal mask) as one float mask."""
    n_queries, n_keys = q.shape[2], k.shape[2]
    # Every query sees every key, e.g. one decoding step: nothing to mask.
    sees_all = causal and int(q_pos.min()) >= int(k_pos.max())
    plain_causal = causal and n_queries == n_keys and bool((q_pos == k_pos).all())
    if bias is None and (plain_causal or not causal or sees_all):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and not sees_all)
    mask = torch.zeros(n_queries, n_keys, dtype=q.dtype, device=q.device) if bias is None else bias
    mask = mask.to(q.dtype)
    if causal and not sees_all:
        mask = mask.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
