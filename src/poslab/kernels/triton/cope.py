"""CoPE attention (causal, gates from q.k) as a Triton kernel, tiled over keys.

The interpolated table enters as z = q e^T / sqrt(Dh), (B, H, T, P), computed by PyTorch (so the
gradients of q and e through z are autograd's); the kernel gathers z[floor p] and z[ceil p] per entry.

Forward, one program per (query block, batch x head): the key tiles are visited from the block's last
visible key backwards, so the positions p_ij = sum_{t=j..i} g_it are a running sum of the gates of the
later tiles (carried per row) plus a reverse cumulative sum inside the tile; then the clamp, the
interpolation, and an online softmax. Only the output and each row's log-sum-exp are kept.

Backward, the same programs, two passes over the key tiles in the same order, each recomputing the
tile (gates, positions, probabilities from the lse): the first adds dv and dz (scattered at floor p
and ceil p) and sums each row's dp = dlogits (z[ceil p] - z[floor p]); the second forms
dg_it = sum_{j <= t} dp_ij = rowsum(dp) - sum_{j > t} dp_ij from the running suffix, ds = dlogits +
dg g (1 - g), and dq (in registers) and dk (atomically). Memory: O(T x P) for z and dz, nothing of
size (T, S).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from poslab.kernels.triton.common import block_sizes, float32_zeros


@triton.jit
def _cope_tile(q, k, qp, rn, rm, m_row, carry, Z, bh, T, S, P, scale):
    """Scores, gates, positions and logits of one tile; the carry is the gate sum of later tiles."""
    m_col = rn < S
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    valid = m_row[:, None] & m_col[None, :] & (rn[None, :] <= qp[:, None])
    g = tl.where(valid, tl.sigmoid(s), 0.0)
    pos = carry[:, None] + tl.cumsum(g, axis=1, reverse=True)
    pos = tl.minimum(pos, P - 1.0)
    fl = tl.floor(pos)
    w = pos - fl
    row = Z + (bh * T + rm[:, None]) * P
    i_fl = fl.to(tl.int32)
    i_ce = tl.ceil(pos).to(tl.int32)
    z_fl = tl.load(row + i_fl, mask=valid, other=0.0)
    z_ce = tl.load(row + i_ce, mask=valid, other=0.0)
    diff = z_ce - z_fl
    logits = s + z_fl + w * diff
    return s, g, w, i_fl, i_ce, diff, tl.where(valid, logits, float("-inf")), valid


@triton.jit
def _cope_fwd(
    Q, K, V, QPOS, Z, O, LSE, H, T, S, D, DV, P, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    m_row = rm < T
    qp = tl.load(QPOS + rm, mask=m_row, other=0)
    q = tl.load(
        Q + bh * T * D + rm[:, None] * D + rd[None, :], mask=m_row[:, None] & (rd[None, :] < D), other=0.0
    )
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DVP), dtype=tl.float32)
    carry = tl.zeros((BM,), dtype=tl.float32)
    hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    n_tiles = tl.cdiv(hi, BN)
    for it in range(0, n_tiles):
        rn = (n_tiles - 1 - it) * BN + tl.arange(0, BN)
        m_col = rn < S
        k = tl.load(
            K + bh * S * D + rn[:, None] * D + rd[None, :], mask=m_col[:, None] & (rd[None, :] < D), other=0.0
        )
        v = tl.load(
            V + bh * S * DV + rn[:, None] * DV + rdv[None, :],
            mask=m_col[:, None] & (rdv[None, :] < DV),
            other=0.0,
        )
        _, g, _, _, _, _, s, _ = _cope_tile(q, k, qp, rn, rm, m_row, carry, Z, bh, T, S, P, scale)
        carry += tl.sum(g, 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        O + bh * T * DV + rm[:, None] * DV + rdv[None, :],
        out.to(O.dtype.element_ty),
        mask=m_row[:, None] & (rdv[None, :] < DV),
    )
    tl.store(LSE + bh * T + rm, m_i + tl.log(l_safe), mask=m_row)


@triton.jit
def _cope_bwd(
    Q, K, V, QPOS, Z, DO, LSE, DELTA, DQ, DK, DVB, DZ, H, T, S, D, DV, P, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    m_row = rm < T
    m_d = rd[None, :] < D
    m_dv = rdv[None, :] < DV
    qp = tl.load(QPOS + rm, mask=m_row, other=0)
    q = tl.load(Q + bh * T * D + rm[:, None] * D + rd[None, :], mask=m_row[:, None] & m_d, other=0.0)
    do = tl.load(
        DO + bh * T * DV + rm[:, None] * DV + rdv[None, :], mask=m_row[:, None] & m_dv, other=0.0
    ).to(tl.float32)
    lse = tl.load(LSE + bh * T + rm, mask=m_row, other=0.0)
    delta = tl.load(DELTA + bh * T + rm, mask=m_row, other=0.0)
    dz_row = DZ + (bh * T + rm[:, None]) * P
    hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    n_tiles = tl.cdiv(hi, BN)
    # Pass 1: dv, dz, and each row's sum of dp.
    carry = tl.zeros((BM,), dtype=tl.float32)
    total = tl.zeros((BM,), dtype=tl.float32)
    for it in range(0, n_tiles):
        rn = (n_tiles - 1 - it) * BN + tl.arange(0, BN)
        m_col = rn < S
        k = tl.load(K + bh * S * D + rn[:, None] * D + rd[None, :], mask=m_col[:, None] & m_d, other=0.0)
        v = tl.load(V + bh * S * DV + rn[:, None] * DV + rdv[None, :], mask=m_col[:, None] & m_dv, other=0.0)
        _, g, w, i_fl, i_ce, diff, s, valid = _cope_tile(
            q, k, qp, rn, rm, m_row, carry, Z, bh, T, S, P, scale
        )
        carry += tl.sum(g, 1)
        prob = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(prob), do, input_precision="ieee")
        tl.atomic_add(DVB + bh * S * DV + rn[:, None] * DV + rdv[None, :], dv, mask=m_col[:, None] & m_dv)
        dprob = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision="ieee")
        dl = tl.where(valid, prob * (dprob - delta[:, None]), 0.0)
        up = dl * w
        tl.atomic_add(dz_row + i_ce, up, mask=valid)
        tl.atomic_add(dz_row + i_fl, dl - up, mask=valid)
        total += tl.sum(dl * diff, 1)
    # Pass 2: dg = rowsum(dp) - (dp of the keys after t), ds, dq and dk.
    carry = tl.zeros((BM,), dtype=tl.float32)
    after = tl.zeros((BM,), dtype=tl.float32)
    dq = tl.zeros((BM, DP), dtype=tl.float32)
    for it in range(0, n_tiles):
        rn = (n_tiles - 1 - it) * BN + tl.arange(0, BN)
        m_col = rn < S
        k = tl.load(K + bh * S * D + rn[:, None] * D + rd[None, :], mask=m_col[:, None] & m_d, other=0.0)
        v = tl.load(V + bh * S * DV + rn[:, None] * DV + rdv[None, :], mask=m_col[:, None] & m_dv, other=0.0)
        _, g, w, i_fl, i_ce, diff, s, valid = _cope_tile(
            q, k, qp, rn, rm, m_row, carry, Z, bh, T, S, P, scale
        )
        carry += tl.sum(g, 1)
        prob = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dprob = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision="ieee")
        dl = tl.where(valid, prob * (dprob - delta[:, None]), 0.0)
        dpos = dl * diff
        suffix = tl.cumsum(dpos, axis=1, reverse=True) - dpos  # sum over the tile's keys after t
        dg = total[:, None] - after[:, None] - suffix
        after += tl.sum(dpos, 1)
        ds = tl.where(valid, dl + dg * g * (1.0 - g), 0.0)
        dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
        dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee") * scale
        tl.atomic_add(DK + bh * S * D + rn[:, None] * D + rd[None, :], dk, mask=m_col[:, None] & m_d)
    tl.store(DQ + bh * T * D + rm[:, None] * D + rd[None, :], dq * scale, mask=m_row[:, None] & m_d)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class CoPETritonFn(torch.autograd.Function):
    """softmax(CoPE logits, causal) @ v; z = q e^T / sqrt(Dh) is an input (its gradient dz)."""

    @staticmethod
    def forward(ctx, q, k, v, z, q_pos):  # noqa: D102
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        out = torch.empty(n_batch, n_heads, n_queries, value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_batch, n_heads, n_queries, dtype=torch.float32, device=q.device)
        bm, bn = block_sizes(q)
        z32 = z.detach().float().contiguous()
        grid = (triton.cdiv(n_queries, bm), n_batch * n_heads)
        _cope_fwd[grid](
            q, k, v, q_pos, z32, out, lse, n_heads, n_queries, n_keys, head_dim, value_dim, z.shape[-1],
            1.0 / math.sqrt(head_dim), BM=bm, BN=bn, DP=_pow2(head_dim), DVP=_pow2(value_dim),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, z32, q_pos, out, lse)
        ctx.z_dtype = z.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, z32, q_pos, out, lse = ctx.saved_tensors
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv, dz = (float32_zeros(t.shape, q) for t in (q, k, v, z32))
        bm, bn = block_sizes(q)
        grid = (triton.cdiv(n_queries, bm), n_batch * n_heads)
        _cope_bwd[grid](
            q, k, v, q_pos, z32, grad_out, lse, delta, dq, dk, dv, dz,
            n_heads, n_queries, n_keys, head_dim, value_dim, z32.shape[-1], 1.0 / math.sqrt(head_dim),
            BM=bm, BN=bn, DP=_pow2(head_dim), DVP=_pow2(value_dim),
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dz.to(ctx.z_dtype), None


def cope_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, table: Tensor, npos_max: int) -> Tensor:
    """Causal CoPE attention: q (B, H, T, Dh) (rotated already for cope+rope), k, v (B, H, S, *),
    q_pos (T,), table (npos_max, Dh), the decoder's half of CoPE's ``pos_emb``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    z = q @ table.to(q.dtype).t() / math.sqrt(q.shape[-1])  # (B, H, T, npos_max), through autograd
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    return CoPETritonFn.apply(q, k, v, z, q_pos)
