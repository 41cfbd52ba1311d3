"""DAPE attention (the pointwise MLP, kernel_size 1) as a Triton kernel: logits = A + B + f([A; B]),
f = Linear(2H -> D) -> LeakyReLU(0.01) -> Linear(D -> H), mixing the heads at every (i, j).

Since f mixes heads, one program handles every head of a (query block, batch): the tile holds
A (H, BM, BN) (a batched product), B gathered from the base's distance table (as the bias kernels
do; none for NoPE or RoPE bases), and the hidden map is formed one of its D channels at a time, so
it never exists as a (D, BM, BN) tensor. An online softmax per head; the output and the row
log-sum-exp are kept. Backward recomputes each tile (the hidden channels twice: once for the
logits, once for their gradients), keeps dq in registers and adds dk, dv, the table's and f's
gradients atomically. Memory: nothing of size (T, S).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from poslab.kernels.triton.common import block_sizes, float32_zeros


@triton.jit
def _dape_tile(
    Q_ROW, q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """k (H, BN, DP), A, B (H, BM, BN), the logits and the visibility (BM, BN)."""
    m_col = rn < S
    kp = K + (bh0 + rh[:, None, None]) * S * D + rn[None, :, None] * D + rd[None, None, :]
    k = tl.load(kp, mask=m_h[:, None, None] & m_col[None, :, None] & (rd[None, None, :] < D), other=0.0)
    a = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision="ieee") * scale
    valid = m_row[:, None] & m_col[None, :]
    if CAUSAL:
        valid = valid & (rn[None, :] <= qp[:, None])
    if HAS_TAB:
        idx = C_OFF - qp[:, None] + rn[None, :]
        if CAUSAL:
            idx = tl.minimum(idx, C_OFF)
        ok = (idx >= 0) & (idx < N_TAB)
        b = tl.load(
            TAB + rh[:, None, None] * N_TAB + idx[None, :, :], mask=m_h[:, None, None] & ok[None], other=0.0
        )
    else:
        b = tl.zeros(a.shape, dtype=tl.float32)
    logits = a + b if ADD_BASE else a
    logits += tl.load(B2 + rh, mask=m_h, other=0.0)[:, None, None]
    for w in tl.static_range(WIDTH):
        w1a = tl.load(W1 + w * 2 * H + rh, mask=m_h, other=0.0)
        w1b = tl.load(W1 + w * 2 * H + H + rh, mask=m_h, other=0.0)
        pre = tl.sum(w1a[:, None, None] * a + w1b[:, None, None] * b, 0) + tl.load(B1 + w)
        u = tl.where(pre > 0, pre, 0.01 * pre)
        logits += tl.load(W2 + rh * WIDTH + w, mask=m_h, other=0.0)[:, None, None] * u[None]
    logits = tl.where(valid[None] & m_h[:, None, None], logits, float("-inf"))
    return k, a, b, logits, valid


@triton.jit
def _dape_fwd(
    Q, K, V, QPOS, O, LSE, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, WIDTH: tl.constexpr,
    HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
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
    rows = (bh0 + rh[:, None, None]) * T + rm[None, :, None]  # (HP, BM, 1)
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
        _, _, _, s, _ = _dape_tile(
            Q, q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
            CAUSAL, HAS_TAB, ADD_BASE, WIDTH,
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
def _dape_bwd(
    Q, K, V, QPOS, DO, LSE, DELTA, DQ, DK, DVB, TAB, N_TAB, C_OFF, W1, B1, W2, B2,
    DTAB, DW1, DB1, DW2, DB2, H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, HAS_TAB: tl.constexpr, ADD_BASE: tl.constexpr, WIDTH: tl.constexpr,
    HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
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
    m_d = rd[None, None, :] < D
    m_dv = rdv[None, None, :] < DV
    q = tl.load(Q + rows * D + rd[None, None, :], mask=m_rows & m_d, other=0.0)
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
        m_col = rn < S
        k, a, b, s, valid = _dape_tile(
            Q, q, K, bh0, rh, m_h, rn, rd, qp, m_row, TAB, N_TAB, C_OFF, W1, B1, W2, B2, H, S, D, scale,
            CAUSAL, HAS_TAB, ADD_BASE, WIDTH,
        )  # fmt: skip
        keys = (bh0 + rh[:, None, None]) * S + rn[None, :, None]
        m_keys = m_h[:, None, None] & m_col[None, :, None]
        v = tl.load(V + keys * DV + rdv[None, None, :], mask=m_keys & m_dv, other=0.0)
        ok = valid[None] & m_h[:, None, None]
        p = tl.where(ok, tl.exp(s - lse[:, :, None]), 0.0)
        dv = tl.dot(tl.permute(p, (0, 2, 1)), do, input_precision="ieee")
        tl.atomic_add(DVB + keys * DV + rdv[None, None, :], dv, mask=m_keys & m_dv)
        dp = tl.dot(do, tl.permute(v.to(tl.float32), (0, 2, 1)), input_precision="ieee")
        dl = tl.where(ok, p * (dp - delta[:, :, None]), 0.0)  # dL/dlogits (H, BM, BN)
        tl.atomic_add(DB2 + rh, tl.sum(tl.sum(dl, 2), 1), mask=m_h)
        da = dl
        db = dl if ADD_BASE else tl.zeros(dl.shape, dtype=tl.float32)
        for w in tl.static_range(WIDTH):
            w1a = tl.load(W1 + w * 2 * H + rh, mask=m_h, other=0.0)
            w1b = tl.load(W1 + w * 2 * H + H + rh, mask=m_h, other=0.0)
            pre = tl.sum(w1a[:, None, None] * a + w1b[:, None, None] * b, 0) + tl.load(B1 + w)
            u = tl.where(pre > 0, pre, 0.01 * pre)
            w2 = tl.load(W2 + rh * WIDTH + w, mask=m_h, other=0.0)
            tl.atomic_add(DW2 + rh * WIDTH + w, tl.sum(tl.sum(dl * u[None], 2), 1), mask=m_h)
            dh = tl.sum(w2[:, None, None] * dl, 0) * tl.where(pre > 0, 1.0, 0.01)  # (BM, BN)
            tl.atomic_add(DB1 + w, tl.sum(tl.sum(dh, 1), 0))
            tl.atomic_add(DW1 + w * 2 * H + rh, tl.sum(tl.sum(dh[None] * a, 2), 1), mask=m_h)
            if HAS_TAB:
                tl.atomic_add(DW1 + w * 2 * H + H + rh, tl.sum(tl.sum(dh[None] * b, 2), 1), mask=m_h)
            da += w1a[:, None, None] * dh[None]
            db += w1b[:, None, None] * dh[None]
        da = tl.where(ok, da, 0.0)
        dq += tl.dot(da, k.to(tl.float32), input_precision="ieee")
        dk = tl.dot(tl.permute(da, (0, 2, 1)), q.to(tl.float32), input_precision="ieee") * scale
        tl.atomic_add(DK + keys * D + rd[None, None, :], dk, mask=m_keys & m_d)
        if HAS_TAB:
            idx = C_OFF - qp[:, None] + rn[None, :]
            if CAUSAL:
                idx = tl.minimum(idx, C_OFF)
            in_tab = valid & (idx >= 0) & (idx < N_TAB)
            tab_ptr = DTAB + rh[:, None, None] * N_TAB + idx[None, :, :]
            tl.atomic_add(tab_ptr, db, mask=m_h[:, None, None] & in_tab[None])
    tl.store(DQ + rows * D + rd[None, None, :], dq * scale, mask=m_rows & m_d)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


class DAPETritonFn(torch.autograd.Function):
    """softmax(A + B + f([A; B]), causal) @ v; B from a distance table (or zero)."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, causal, add_base, c_off, table, w1, b1, w2, b2):  # noqa: D102
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        out = torch.empty(n_batch, n_heads, n_queries, value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_batch, n_heads, n_queries, dtype=torch.float32, device=q.device)
        weights = [t.detach().float().contiguous() for t in (w1, b1, w2, b2)]
        tab = table.detach().float().contiguous() if table is not None else weights[1]
        n_tab = table.shape[-1] if table is not None else 1
        bm, bn = block_sizes(q, "dape")
        grid = (triton.cdiv(n_queries, bm), n_batch)
        meta = dict(
            CAUSAL=causal, HAS_TAB=table is not None, ADD_BASE=add_base, WIDTH=w1.shape[0],
            HP=_pow2(n_heads, 1), BM=bm, BN=bn, DP=_pow2(head_dim), DVP=_pow2(value_dim),
        )  # fmt: skip
        _dape_fwd[grid](
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
        bm, _ = block_sizes(q, "dape")
        grid = (triton.cdiv(n_queries, bm), n_batch)
        _dape_bwd[grid](
            q, k, v, q_pos, grad_out, lse, delta, dq, dk, dv, tab, ctx.n_tab, ctx.c_off, *weights,
            dtab, *dweights, n_heads, n_queries, n_keys, head_dim, value_dim, 1.0 / math.sqrt(head_dim),
            **ctx.meta,
        )  # fmt: skip
        dtypes = ctx.dtypes
        grad_table = dtab.to(dtypes[0]) if ctx.has_table else None
        grads = [g.to(t) for g, t in zip(dweights, dtypes[1:], strict=True)]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, grad_table, *grads


def dape_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, dape, table: Tensor | None, c_off: int, *,
                   causal: bool) -> Tensor:  # fmt: skip
    """DAPE (kernel_size 1, a form reading A) with B = table[h, c_off - i + j] (or 0 when None)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    first, _, second = dape.mlp
    return DAPETritonFn.apply(
        q, k, v, q_pos, causal, dape.add_base, c_off, table, first.weight, first.bias, second.weight,
        second.bias,
    )  # fmt: skip
