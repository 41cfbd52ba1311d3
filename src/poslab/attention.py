"""Attention with a position encoding: one function, a fused path and the eager reference path.

``attend`` applies the encoding's hooks (rotate, bias, logits; DESIGN.md section 1), then either calls
``F.scaled_dot_product_attention`` with the bias as a float mask (when the encoding does not rewrite
logits) or runs the eager path, which is also the executable specification tests compare against.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.encodings.base import PositionEncoding, causal_mask

Impl = Literal["auto", "fused", "eager"]
IMPLS = ("auto", "fused", "eager")


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
) -> Tensor:
    """Scaled dot-product attention with a position encoding.

    Args:
        q: queries (B, H, T, Dh).
        k, v: keys and values (B, H, S, Dh); keys sit at positions 0..S-1.
        encoding: a ``PositionEncoding`` (None means NoPE).
        causal: decoder (key j visible to query i iff j <= i) or encoder (all keys visible).
        positions: (T,) integer positions of the queries; default S - T + arange(T), i.e. the queries
            are the last T keys (a full forward when T == S, cached decoding when T < S).
        impl: 'auto' (fused SDPA when the encoding allows it), 'fused' (raise if it does not), or
            'eager' (the reference path).

    Returns:
        (B, H, T, Dv) attention outputs.
    """
    check_qkv(q, k, v)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    n_queries, n_keys = q.shape[2], k.shape[2]
    if positions is None:
        if n_queries > n_keys:
            raise ValueError(f"attend: more queries ({n_queries}) than keys ({n_keys}) needs positions")
        positions = default_positions(n_queries, n_keys, q.device)
    elif positions.shape != (n_queries,):
        raise ValueError(f"positions must have shape ({n_queries},), got {tuple(positions.shape)}")
    q_pos, k_pos = positions.to(q.device), torch.arange(n_keys, device=q.device)

    bias = None
    if encoding is not None:
        encoding.check_mode(causal)
        encoding.check_length(max(int(q_pos.max()), n_keys - 1))
        if "rotate" in encoding.hooks:
            q, k = encoding.rotate(q, k, q_pos, k_pos)
        if "bias" in encoding.hooks:
            bias = encoding.bias(q_pos, k_pos, causal=causal)

    rewrites = encoding is not None and encoding.uses_logits
    if impl == "fused" and rewrites:
        raise ValueError(f"encoding {encoding.name!r} rewrites logits; the fused path cannot run it")
    if impl == "eager" or rewrites:
        return eager_attention(q, k, v, encoding, bias, q_pos, k_pos, causal=causal)
    return fused_attention(q, k, v, bias, q_pos, k_pos, causal=causal)


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
) -> Tensor:
    """The reference path: materialise the logits, let the encoding rewrite them, mask, softmax."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if encoding is not None and encoding.uses_logits:
        logits = encoding.logits(scores, bias, q, k, v, q_pos, k_pos, causal=causal)
    else:
        logits = scores if bias is None else scores + bias.to(scores.dtype)
    if causal:
        logits = logits.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v  # (B, H, T, Dv)


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
    plain_causal = causal and n_queries == n_keys and bool((q_pos == k_pos).all())
    if bias is None and (plain_causal or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = torch.zeros(n_queries, n_keys, dtype=q.dtype, device=q.device) if bias is None else bias
    mask = mask.to(q.dtype)
    if causal:
        mask = mask.masked_fill(~causal_mask(q_pos, k_pos), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
