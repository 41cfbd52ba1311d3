"""DAPE V2 (kernel_size 3) as a Triton kernel: f = Conv2d(2H -> D, (1, 3)) -> LeakyReLU -> Conv2d(D ->
H, (1, 3)) sliding along the keys of each query row, fused into the attention tile.

A logit at key j reads the hidden map at j - 1..j + 1, which reads [A; B] at j - 2..j + 2: each tile
recomputes A (a batched product with the keys shifted by u = -2..2) and B at the five shifts, zeroed
where the key does not exist (the convolutions' zero padding) and, in causal use, after the query
(the input mask; the hidden map too unless ``v2_mask='input'``). The hidden map is formed one of its
D channels at a time, at the three shifts. Backward recomputes the tile, takes the gradient back
through both convolutions to the five shifted [A; B] tiles, and from them to dq (in registers), dk at
the shifted keys and the base's table (atomically); the convolutions' weight gradients are reduced in
the tile and added atomically. As in the MLP kernel, nothing of size (T, S) is built.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from poslab.kernels.triton.common import block_sizes, float32_zeros


@triton.jit
def _shifted(
    q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale,
    U: tl.constexpr, CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr,
):  # fmt: skip
    """k, A, B at the keys rn + U, the latter two zeroed outside the keys (and after the query when
    causal); the mask and the key indices."""
    kn = rn + U
    in_keys = (kn >= 0) & (kn < S)
    kp = K + (bh0 + rh[:, None, None]) * S * D + kn[None, :, None] * D + rd[None, None, :]
    k = tl.load(kp, mask=m_h[:, None, None] & in_keys[None, :, None] & (rd[None, None, :] < D), other=0.0)
    a = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision="ieee") * scale
    keep = m_row[:, None] & in_keys[None, :]
    if CAUSAL:
        keep = keep & (kn[None, :] <= qp[:, None])
    keep3 = keep[None] & m_h[:, None, None]
    if HAS_TAB:
        idx = C_OFF - qp[:, None] + kn[None, :]
        if CAUSAL:
            idx = tl.minimum(idx, C_OFF)
        ok = (idx >= 0) & (idx < N_TAB)
        b = tl.load(TAB + rh[:, None, None] * N_TAB + idx[None, :, :], mask=keep3 & ok[None], other=0.0)
    else:
        b = tl.zeros(a.shape, dtype=tl.float32)
    return k, tl.where(keep3, a, 0.0), b, keep, kn


@triton.jit
def _pre(W1, B1, w, H, rh, m_h, a_m, a_0, a_p, b_m, b_0, b_p):
    """conv_in's channel w at one key from [A; B] at the key before, the key and the key after."""
    base = W1 + w * 2 * H * 3
    x = tl.load(base + rh * 3 + 0, mask=m_h, other=0.0)[:, None, None] * a_m
    x += tl.load(base + rh * 3 + 1, mask=m_h, other=0.0)[:, None, None] * a_0
    x += tl.load(base + rh * 3 + 2, mask=m_h, other=0.0)[:, None, None] * a_p
    x += tl.load(base + (H + rh) * 3 + 0, mask=m_h, other=0.0)[:, None, None] * b_m
    x += tl.load(base + (H + rh) * 3 + 1, mask=m_h, other=0.0)[:, None, None] * b_0
    x += tl.load(base + (H + rh) * 3 + 2, mask=m_h, other=0.0)[:, None, None] * b_p
    return tl.sum(x, 0) + tl.load(B1 + w)


@triton.jit
def _hidden_mask(rn, qp, m_row, S, U: tl.constexpr, CAUSAL: tl.constexpr, HIDDEN: tl.constexpr):
    kn = rn + U
    keep = m_row[:, None] & ((kn >= 0) & (kn < S))[None, :]
    if CAUSAL and HIDDEN:
        keep = keep & (kn[None, :] <= qp[:, None])
    return keep


@triton.jit
def _leaky(x):
    return tl.where(x > 0, x, 0.01 * x)


@triton.jit
def _v2_logits(
    q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, HIDDEN: tl.constexpr,
    WIDTH: tl.constexpr,
):  # fmt: skip
    _, a0, b0, _, _ = _shifted(
        q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, -2, CAUSAL, HAS_TAB
    )
    _, a1, b1, _, _ = _shifted(
        q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, -1, CAUSAL, HAS_TAB
    )
    _, a2, b2, keep, _ = _shifted(
        q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 0, CAUSAL, HAS_TAB
    )
    _, a3, b3, _, _ = _shifted(
        q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 1, CAUSAL, HAS_TAB
    )
    _, a4, b4, _, _ = _shifted(
        q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 2, CAUSAL, HAS_TAB
    )
    hm = _hidden_mask(rn, qp, m_row, S, -1, CAUSAL, HIDDEN)
    h0 = _hidden_mask(rn, qp, m_row, S, 0, CAUSAL, HIDDEN)
    hp = _hidden_mask(rn, qp, m_row, S, 1, CAUSAL, HIDDEN)
    logits = a2 + b2 if ADD_BASE else a2
    logits += tl.load(B2 + rh, mask=m_h, other=0.0)[:, None, None]
    for w in tl.static_range(WIDTH):
        u_m = tl.where(hm, _leaky(_pre(W1, B1, w, H, rh, m_h, a0, a1, a2, b0, b1, b2)), 0.0)
        u_0 = tl.where(h0, _leaky(_pre(W1, B1, w, H, rh, m_h, a1, a2, a3, b1, b2, b3)), 0.0)
        u_p = tl.where(hp, _leaky(_pre(W1, B1, w, H, rh, m_h, a2, a3, a4, b2, b3, b4)), 0.0)
        w2 = W2 + rh * WIDTH * 3 + w * 3
        logits += tl.load(w2 + 0, mask=m_h, other=0.0)[:, None, None] * u_m[None]
        logits += tl.load(w2 + 1, mask=m_h, other=0.0)[:, None, None] * u_0[None]
        logits += tl.load(w2 + 2, mask=m_h, other=0.0)[:, None, None] * u_p[None]
    return tl.where(keep[None] & m_h[:, None, None], logits, float("-inf")), keep


@triton.jit
def _v2_fwd(
    Q, K, V, QPOS, O, LSE, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, HIDDEN: tl.constexpr,
    WIDTH: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh0 = tl.program_id(1) * H
    rh = tl.arange(0, HP)
    m_h = rh < H
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    m_row = rm < T
    qp = tl.load(QPOS + rm, mask=m_row, other=0)
    rows = (bh0 + rh[:, None, None]) * T + rm[None, :, None]
    m_rows = m_h[:, None, None] & m_row[None, :, None]
    q = tl.load(Q + rows * D + rd[None, None, :], mask=m_rows & (rd[None, None, :] < D), other=0.0)
    m_i = tl.full((HP, BM), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((HP, BM), dtype=tl.float32)
    acc = tl.zeros((HP, BM, DVP), dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        s, _ = _v2_logits(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
            CAUSAL, HAS_TAB, ADD_BASE, HIDDEN, WIDTH,
        )  # fmt: skip
        vp = V + (bh0 + rh[:, None, None]) * S * DV + rn[None, :, None] * DV + rdv[None, None, :]
        v = tl.load(
            vp, mask=m_h[:, None, None] & (rn < S)[None, :, None] & (rdv[None, None, :] < DV), other=0.0
        )
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, :, None]
    tl.store(
        O + rows * DV + rdv[None, None, :],
        out.to(O.dtype.element_ty),
        mask=m_rows & (rdv[None, None, :] < DV),
    )
    lse_rows = (bh0 + rh[:, None]) * T + rm[None, :]
    tl.store(LSE + lse_rows, m_i + tl.log(l_safe), mask=m_h[:, None] & m_row[None, :])


@triton.jit
def _sum2(x):
    return tl.sum(tl.sum(x, 2), 1)


@triton.jit
def _back_to_keys(
    da, db, k, kn, keep, q, dq, DK, DTAB, bh0, rh, m_h, rd, qp, N_TAB, C_OFF, S, D, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr,
):  # fmt: skip
    """dq, dk and dtab from the gradients of one shifted [A; B] tile."""
    keep3 = keep[None] & m_h[:, None, None]
    da = tl.where(keep3, da, 0.0)
    dq += tl.dot(da, k.to(tl.float32), input_precision="ieee")
    dk = tl.dot(tl.permute(da, (0, 2, 1)), q.to(tl.float32), input_precision="ieee") * scale
    in_keys = (kn >= 0) & (kn < S)
    dkp = DK + ((bh0 + rh[:, None, None]) * S + kn[None, :, None]) * D + rd[None, None, :]
    tl.atomic_add(dkp, dk, mask=m_h[:, None, None] & in_keys[None, :, None] & (rd[None, None, :] < D))
    if HAS_TAB:
        idx = C_OFF - qp[:, None] + kn[None, :]
        if CAUSAL:
            idx = tl.minimum(idx, C_OFF)
        ok = (idx >= 0) & (idx < N_TAB)
        tl.atomic_add(DTAB + rh[:, None, None] * N_TAB + idx[None, :, :], db, mask=keep3 & ok[None])
    return dq


@triton.jit
def _v2_bwd(
    Q, K, V, QPOS, DO, LSE, DELTA, DQ, DK, DVB, TAB, N_TAB, C_OFF, W1, B1, W2, B2,
    DTAB, DW1, DB1, DW2, DB2, H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, HIDDEN: tl.constexpr,
    WIDTH: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh0 = tl.program_id(1) * H
    rh = tl.arange(0, HP)
    m_h = rh < H
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rdv = tl.arange(0, DVP)
    m_row = rm < T
    qp = tl.load(QPOS + rm, mask=m_row, other=0)
    rows = (bh0 + rh[:, None, None]) * T + rm[None, :, None]
    m_rows = m_h[:, None, None] & m_row[None, :, None]
    m_dv = rdv[None, None, :] < DV
    q = tl.load(Q + rows * D + rd[None, None, :], mask=m_rows & (rd[None, None, :] < D), other=0.0)
    do = tl.load(DO + rows * DV + rdv[None, None, :], mask=m_rows & m_dv, other=0.0).to(tl.float32)
    row_ids = (bh0 + rh[:, None]) * T + rm[None, :]
    m_hr = m_h[:, None] & m_row[None, :]
    lse = tl.load(LSE + row_ids, mask=m_hr, other=0.0)
    delta = tl.load(DELTA + row_ids, mask=m_hr, other=0.0)
    dq = tl.zeros((HP, BM, DP), dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        k0, a0, b0, e0, n0 = _shifted(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, -2, CAUSAL, HAS_TAB
        )
        k1, a1, b1, e1, n1 = _shifted(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, -1, CAUSAL, HAS_TAB
        )
        k2, a2, b2, e2, n2 = _shifted(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 0, CAUSAL, HAS_TAB
        )
        k3, a3, b3, e3, n3 = _shifted(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 1, CAUSAL, HAS_TAB
        )
        k4, a4, b4, e4, n4 = _shifted(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, H, S, D, scale, 2, CAUSAL, HAS_TAB
        )
        s, keep = _v2_logits(
            q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
            CAUSAL, HAS_TAB, ADD_BASE, HIDDEN, WIDTH,
        )  # fmt: skip
        keys = (bh0 + rh[:, None, None]) * S + rn[None, :, None]
        m_keys = m_h[:, None, None] & (rn < S)[None, :, None]
        v = tl.load(V + keys * DV + rdv[None, None, :], mask=m_keys & m_dv, other=0.0)
        ok = keep[None] & m_h[:, None, None]
        p = tl.where(ok, tl.exp(s - lse[:, :, None]), 0.0)
        dv = tl.dot(tl.permute(p, (0, 2, 1)), do, input_precision="ieee")
        tl.atomic_add(DVB + keys * DV + rdv[None, None, :], dv, mask=m_keys & m_dv)
        dp = tl.dot(do, tl.permute(v.to(tl.float32), (0, 2, 1)), input_precision="ieee")
        dl = tl.where(ok, p * (dp - delta[:, :, None]), 0.0)
        tl.atomic_add(DB2 + rh, _sum2(dl), mask=m_h)
        hm = _hidden_mask(rn, qp, m_row, S, -1, CAUSAL, HIDDEN)
        h0 = _hidden_mask(rn, qp, m_row, S, 0, CAUSAL, HIDDEN)
        hp = _hidden_mask(rn, qp, m_row, S, 1, CAUSAL, HIDDEN)
        zero = tl.zeros(dl.shape, dtype=tl.float32)
        da0, da1, da2, da3, da4 = zero, zero, dl, zero, zero
        db0, db1, db3, db4 = zero, zero, zero, zero
        db2 = dl if ADD_BASE else zero
        for w in tl.static_range(WIDTH):
            pre_m = _pre(W1, B1, w, H, rh, m_h, a0, a1, a2, b0, b1, b2)
            pre_0 = _pre(W1, B1, w, H, rh, m_h, a1, a2, a3, b1, b2, b3)
            pre_p = _pre(W1, B1, w, H, rh, m_h, a2, a3, a4, b2, b3, b4)
            w2 = W2 + rh * WIDTH * 3 + w * 3
            dw2p = DW2 + rh * WIDTH * 3 + w * 3
            tl.atomic_add(dw2p + 0, _sum2(dl * tl.where(hm, _leaky(pre_m), 0.0)[None]), mask=m_h)
            tl.atomic_add(dw2p + 1, _sum2(dl * tl.where(h0, _leaky(pre_0), 0.0)[None]), mask=m_h)
            tl.atomic_add(dw2p + 2, _sum2(dl * tl.where(hp, _leaky(pre_p), 0.0)[None]), mask=m_h)
            # d(pre) at the three shifts: through conv_out's taps, the hidden mask and the LeakyReLU
            g_m = tl.sum(tl.load(w2 + 0, mask=m_h, other=0.0)[:, None, None] * dl, 0)
            g_m = tl.where(hm, g_m * tl.where(pre_m > 0, 1.0, 0.01), 0.0)
            g_0 = tl.sum(tl.load(w2 + 1, mask=m_h, other=0.0)[:, None, None] * dl, 0)
            g_0 = tl.where(h0, g_0 * tl.where(pre_0 > 0, 1.0, 0.01), 0.0)
            g_p = tl.sum(tl.load(w2 + 2, mask=m_h, other=0.0)[:, None, None] * dl, 0)
            g_p = tl.where(hp, g_p * tl.where(pre_p > 0, 1.0, 0.01), 0.0)
            tl.atomic_add(DB1 + w, tl.sum(tl.sum(g_m + g_0 + g_p, 1), 0))
            # conv_in's tap t joins the hidden entry at shift s with [A; B] at shift s + t - 1
            base = W1 + w * 2 * H * 3
            dbase = DW1 + w * 2 * H * 3
            wa0 = tl.load(base + rh * 3 + 0, mask=m_h, other=0.0)[:, None, None]
            wa1 = tl.load(base + rh * 3 + 1, mask=m_h, other=0.0)[:, None, None]
            wa2 = tl.load(base + rh * 3 + 2, mask=m_h, other=0.0)[:, None, None]
            wb0 = tl.load(base + (H + rh) * 3 + 0, mask=m_h, other=0.0)[:, None, None]
            wb1 = tl.load(base + (H + rh) * 3 + 1, mask=m_h, other=0.0)[:, None, None]
            wb2 = tl.load(base + (H + rh) * 3 + 2, mask=m_h, other=0.0)[:, None, None]
            gm, g0, gp = g_m[None], g_0[None], g_p[None]
            tl.atomic_add(dbase + rh * 3 + 0, _sum2(gm * a0 + g0 * a1 + gp * a2), mask=m_h)
            tl.atomic_add(dbase + rh * 3 + 1, _sum2(gm * a1 + g0 * a2 + gp * a3), mask=m_h)
            tl.atomic_add(dbase + rh * 3 + 2, _sum2(gm * a2 + g0 * a3 + gp * a4), mask=m_h)
            if HAS_TAB:
                tl.atomic_add(dbase + (H + rh) * 3 + 0, _sum2(gm * b0 + g0 * b1 + gp * b2), mask=m_h)
                tl.atomic_add(dbase + (H + rh) * 3 + 1, _sum2(gm * b1 + g0 * b2 + gp * b3), mask=m_h)
                tl.atomic_add(dbase + (H + rh) * 3 + 2, _sum2(gm * b2 + g0 * b3 + gp * b4), mask=m_h)
            da0 += wa0 * gm
            da1 += wa1 * gm + wa0 * g0
            da2 += wa2 * gm + wa1 * g0 + wa0 * gp
            da3 += wa2 * g0 + wa1 * gp
            da4 += wa2 * gp
            db0 += wb0 * gm
            db1 += wb1 * gm + wb0 * g0
            db2 += wb2 * gm + wb1 * g0 + wb0 * gp
            db3 += wb2 * g0 + wb1 * gp
            db4 += wb2 * gp
        args = (q, dq, DK, DTAB, bh0, rh, m_h, rd, qp, N_TAB, C_OFF, S, D, scale, CAUSAL, HAS_TAB)
        dq = _back_to_keys(da0, db0, k0, n0, e0, *args)
        dq = _back_to_keys(da1, db1, k1, n1, e1, q, dq, *args[2:])
        dq = _back_to_keys(da2, db2, k2, n2, e2, q, dq, *args[2:])
        dq = _back_to_keys(da3, db3, k3, n3, e3, q, dq, *args[2:])
        dq = _back_to_keys(da4, db4, k4, n4, e4, q, dq, *args[2:])
    tl.store(DQ + rows * D + rd[None, None, :], dq * scale, mask=m_rows & (rd[None, None, :] < D))


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


class DAPEV2TritonFn(torch.autograd.Function):
    """softmax(A + B + conv(leaky(conv([A; B]))), causal) @ v; B from a distance table (or zero)."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, causal, add_base, hidden_mask, c_off, table, w1, b1, w2, b2):  # noqa: D102
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        out = torch.empty(n_batch, n_heads, n_queries, value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_batch, n_heads, n_queries, dtype=torch.float32, device=q.device)
        weights = [t.detach().float().contiguous() for t in (w1, b1, w2, b2)]
        tab = table.detach().float().contiguous() if table is not None else weights[1]
        n_tab = table.shape[-1] if table is not None else 1
        bm, bn = block_sizes(q, "dape_v2")
        meta = dict(
            CAUSAL=causal, HAS_TAB=table is not None, ADD_BASE=add_base, HIDDEN=hidden_mask,
            WIDTH=w1.shape[0], HP=_pow2(n_heads, 1), BM=bm, BN=bn, DP=_pow2(head_dim),
            DVP=_pow2(value_dim),
        )  # fmt: skip
        grid = (triton.cdiv(n_queries, bm), n_batch)
        _v2_fwd[grid](
            q, k, v, q_pos, out, lse, tab, n_tab, c_off, *weights,
            n_heads, n_queries, n_keys, head_dim, value_dim, 1.0 / math.sqrt(head_dim), **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, q_pos, out, lse, tab, *weights)
        ctx.meta, ctx.n_tab, ctx.c_off, ctx.has_table = meta, n_tab, c_off, table is not None
        ctx.dtypes = [None if t is None else t.dtype for t in (table, w1, b1, w2, b2)]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, q_pos, out, lse, tab, *weights = ctx.saved_tensors
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv = (float32_zeros(t.shape, q) for t in (q, k, v))
        dtab = float32_zeros(tab.shape, q)
        dweights = [float32_zeros(t.shape, q) for t in weights]
        grid = (triton.cdiv(n_queries, ctx.meta["BM"]), n_batch)
        _v2_bwd[grid](
            q, k, v, q_pos, grad_out, lse, delta, dq, dk, dv, tab, ctx.n_tab, ctx.c_off, *weights,
            dtab, *dweights, n_heads, n_queries, n_keys, head_dim, value_dim, 1.0 / math.sqrt(head_dim),
            **ctx.meta,
        )  # fmt: skip
        dtypes = ctx.dtypes
        grad_table = dtab.to(dtypes[0]) if ctx.has_table else None
        grads = [g.to(t) for g, t in zip(dweights, dtypes[1:], strict=True)]
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            None,
            None,
            None,
            None,
            None,
            grad_table,
            *grads,
        )


def dape_v2_attention(q, k, v, q_pos, dape, table: Tensor | None, c_off: int, *, causal: bool) -> Tensor:
    """DAPE V2 with kernel_size 3 (either mask) with B = table[h, c_off - i + j] (or 0 when None)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    first, _, second = dape.mlp
    return DAPEV2TritonFn.apply(
        q, k, v, q_pos, causal, dape.add_base, dape.v2_mask == "hidden", c_off, table,
        first.weight, first.bias, second.weight, second.bias,
    )  # fmt: skip
