"""Flash-style attention with a position bias computed in the tile (no (H, T, S) mask).

Two kinds of bias (``poslab.kernels.triton.dispatch`` picks one per encoding):

- MODE 1, a table of the signed distance: bias[h, i, j] = tab[h, c - i + j], c = max(q_pos). The
  table (H, c + 1 + R) is the encoding's own ``bias`` for one query at position c against keys
  0..c + R, so ALiBi, Kerple, T5, Sandwich (and sums of them) tabulate themselves; autograd takes
  its gradient dtab back to the parameters. Causal rows clamp the index at c (distance 0; masked).
- MODE 2, FIRE: x = psi[|i - j|] / norm(i) (negated, with the right-hand norm, for keys after an
  encoder's query), then the MLP 1 -> W -> H evaluated in the tile. psi (distances,), the norms (T,)
  and the MLP's weights come from PyTorch (with autograd); the backward kernel returns their
  gradients, reduced in the tile and added atomically.

Forward: one program per (query block, batch x head), an online softmax over key blocks (causal
rows stop at their last visible key), the output and each row's log-sum-exp kept. Backward: one
program per (query block, batch x head) recomputes the probabilities from the lse, keeps dq in
registers and adds dk, dv and the bias gradients atomically into float32 buffers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from poslab.kernels.triton.common import block_sizes, float32_zeros


@triton.jit
def _fire_x(qp, rn, rm, m_row, PSI, N_PSI, NORM_L, NORM_R, CAUSAL: tl.constexpr):
    n = qp[:, None] - rn[None, :]
    d = tl.maximum(n, 0) if CAUSAL else tl.abs(n)
    psi = tl.load(PSI + d, mask=d < N_PSI, other=0.0)
    norm_l = tl.load(NORM_L + rm, mask=m_row, other=1.0)
    x = psi / norm_l[:, None]
    if not CAUSAL:
        norm_r = tl.load(NORM_R + rm, mask=m_row, other=1.0)
        x = tl.where(n >= 0, x, -(psi / norm_r[:, None]))
    return x, d, n


@triton.jit
def _bias_tile(
    qp, rn, rm, m_row, h, TAB, N_TAB, C_OFF, PSI, N_PSI, NORM_L, NORM_R, W1, B1, W2, B2,
    CAUSAL: tl.constexpr, MODE: tl.constexpr, WIDTH: tl.constexpr, LEAKY: tl.constexpr,
):  # fmt: skip
    if MODE == 1:
        idx = C_OFF - qp[:, None] + rn[None, :]
        if CAUSAL:
            idx = tl.minimum(idx, C_OFF)
        ok = (idx >= 0) & (idx < N_TAB)
        return tl.load(TAB + h * N_TAB + idx, mask=ok, other=0.0)
    else:
        x, d, n = _fire_x(qp, rn, rm, m_row, PSI, N_PSI, NORM_L, NORM_R, CAUSAL)
        out = tl.zeros(x.shape, dtype=tl.float32) + tl.load(B2 + h)
        for w in tl.static_range(WIDTH):
            pre = x * tl.load(W1 + w) + tl.load(B1 + w)
            u = tl.where(pre > 0, pre, 0.01 * pre) if LEAKY else tl.maximum(pre, 0.0)
            out += tl.load(W2 + h * WIDTH + w) * u
        return out


@triton.jit
def _bias_fwd(
    Q, K, V, QPOS, O, LSE,
    TAB, N_TAB, C_OFF, PSI, N_PSI, NORM_L, NORM_R, W1, B1, W2, B2,
    H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, MODE: tl.constexpr, WIDTH: tl.constexpr, LEAKY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
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
    hi = S
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        m_col = rn < S
        k = tl.load(
            K + bh * S * D + rn[:, None] * D + rd[None, :], mask=m_col[:, None] & (rd[None, :] < D), other=0.0
        )
        v = tl.load(
            V + bh * S * DV + rn[:, None] * DV + rdv[None, :],
            mask=m_col[:, None] & (rdv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if MODE != 0:
            s += _bias_tile(
                qp, rn, rm, m_row, h, TAB, N_TAB, C_OFF, PSI, N_PSI, NORM_L, NORM_R, W1, B1, W2, B2,
                CAUSAL, MODE, WIDTH, LEAKY,
            )  # fmt: skip
        valid = m_row[:, None] & m_col[None, :]
        if CAUSAL:
            valid = valid & (rn[None, :] <= qp[:, None])
        s = tl.where(valid, s, float("-inf"))
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
def _bias_bwd(
    Q, K, V, QPOS, DO, LSE, DELTA, DQ, DK, DVB,
    TAB, N_TAB, C_OFF, PSI, N_PSI, NORM_L, NORM_R, W1, B1, W2, B2,
    DTAB, DPSI, DNORM_L, DNORM_R, DW1, DB1, DW2, DB2,
    H, T, S, D, DV, scale,
    CAUSAL: tl.constexpr, MODE: tl.constexpr, WIDTH: tl.constexpr, LEAKY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
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
    dq = tl.zeros((BM, DP), dtype=tl.float32)
    dnorm_l = tl.zeros((BM,), dtype=tl.float32)
    dnorm_r = tl.zeros((BM,), dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(m_row, qp, 0)) + 1, S)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        m_col = rn < S
        k = tl.load(K + bh * S * D + rn[:, None] * D + rd[None, :], mask=m_col[:, None] & m_d, other=0.0)
        v = tl.load(V + bh * S * DV + rn[:, None] * DV + rdv[None, :], mask=m_col[:, None] & m_dv, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if MODE != 0:
            s += _bias_tile(
                qp, rn, rm, m_row, h, TAB, N_TAB, C_OFF, PSI, N_PSI, NORM_L, NORM_R, W1, B1, W2, B2,
                CAUSAL, MODE, WIDTH, LEAKY,
            )  # fmt: skip
        valid = m_row[:, None] & m_col[None, :]
        if CAUSAL:
            valid = valid & (rn[None, :] <= qp[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p), do, input_precision="ieee")
        tl.atomic_add(DVB + bh * S * DV + rn[:, None] * DV + rdv[None, :], dv, mask=m_col[:, None] & m_dv)
        dp = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision="ieee")
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)  # dL/dlogits
        dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
        dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee") * scale
        tl.atomic_add(DK + bh * S * D + rn[:, None] * D + rd[None, :], dk, mask=m_col[:, None] & m_d)
        if MODE == 1:
            idx = C_OFF - qp[:, None] + rn[None, :]
            if CAUSAL:
                idx = tl.minimum(idx, C_OFF)
            ok = valid & (idx >= 0) & (idx < N_TAB)
            tl.atomic_add(DTAB + h * N_TAB + idx, ds, mask=ok)
        if MODE == 2:
            x, d, n = _fire_x(qp, rn, rm, m_row, PSI, N_PSI, NORM_L, NORM_R, CAUSAL)
            tl.atomic_add(DB2 + h, tl.sum(tl.sum(ds, 1), 0))
            dx = tl.zeros(x.shape, dtype=tl.float32)
            for w in tl.static_range(WIDTH):
                w1 = tl.load(W1 + w)
                pre = x * w1 + tl.load(B1 + w)
                if LEAKY:
                    u = tl.where(pre > 0, pre, 0.01 * pre)
                    slope = tl.where(pre > 0, 1.0, 0.01)
                else:
                    u = tl.maximum(pre, 0.0)
                    slope = tl.where(pre > 0, 1.0, 0.0)
                tl.atomic_add(DW2 + h * WIDTH + w, tl.sum(tl.sum(ds * u, 1), 0))
                g = ds * tl.load(W2 + h * WIDTH + w) * slope
                tl.atomic_add(DB1 + w, tl.sum(tl.sum(g, 1), 0))
                tl.atomic_add(DW1 + w, tl.sum(tl.sum(g * x, 1), 0))
                dx += g * w1
            norm_l = tl.load(NORM_L + rm, mask=m_row, other=1.0)
            if CAUSAL:
                left = valid
                norm = norm_l[:, None] + tl.zeros(x.shape, dtype=tl.float32)
            else:
                norm_r = tl.load(NORM_R + rm, mask=m_row, other=1.0)
                left = valid & (n >= 0)
                norm = tl.where(n >= 0, norm_l[:, None], norm_r[:, None])
            right = valid & ~left
            # x = +-psi / norm: dpsi = +-dx / norm, dnorm = -dx x / norm
            dpsi = tl.where(left, dx / norm, -dx / norm)
            tl.atomic_add(DPSI + d, dpsi, mask=valid & (d < N_PSI))
            dn = -dx * x / norm
            dnorm_l += tl.sum(tl.where(left, dn, 0.0), 1)
            dnorm_r += tl.sum(tl.where(right, dn, 0.0), 1)
    tl.store(DQ + bh * T * D + rm[:, None] * D + rd[None, :], dq * scale, mask=m_row[:, None] & m_d)
    if MODE == 2:
        tl.atomic_add(DNORM_L + rm, dnorm_l, mask=m_row)
        if not CAUSAL:
            tl.atomic_add(DNORM_R + rm, dnorm_r, mask=m_row)


class BiasParams:
    """What one call's bias is made of: MODE (0 none, 1 table, 2 FIRE) and its tensors, in the order
    ``tensors()`` hands them to the autograd function (those that may need a gradient)."""

    def __init__(self, mode: int, *, table=None, c_off=0, psi=None, norm_l=None, norm_r=None,
                 w1=None, b1=None, w2=None, b2=None, leaky=False):  # fmt: skip
        self.mode, self.c_off, self.leaky = mode, c_off, leaky
        self.table, self.psi, self.norm_l, self.norm_r = table, psi, norm_l, norm_r
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    def tensors(self) -> list[Tensor | None]:
        return [self.table, self.psi, self.norm_l, self.norm_r, self.w1, self.b1, self.w2, self.b2]


def _prepared(t: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if t is None else t.detach().to(torch.float32).contiguous().reshape(-1)


class BiasAttentionFn(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh) + bias, causal) @ v with the bias computed in the tile."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, causal, params, *bias_tensors):  # noqa: D102
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        out = torch.empty(n_batch, n_heads, n_queries, value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_batch, n_heads, n_queries, dtype=torch.float32, device=q.device)
        bm, bn = block_sizes(q)
        args = _bias_args(params, q)
        grid = (triton.cdiv(n_queries, bm), n_batch * n_heads)
        _bias_fwd[grid](
            q, k, v, q_pos, out, lse, *args,
            n_heads, n_queries, n_keys, head_dim, value_dim, 1.0 / math.sqrt(head_dim),
            CAUSAL=causal, MODE=params.mode, WIDTH=_width(params), LEAKY=params.leaky,
            BM=bm, BN=bn, DP=_pow2(head_dim), DVP=_pow2(value_dim),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, q_pos, out, lse, *bias_tensors)
        ctx.causal, ctx.params = causal, params
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, q_pos, out, lse, *bias_tensors = ctx.saved_tensors
        params = ctx.params
        n_batch, n_heads, n_queries, head_dim = q.shape
        n_keys, value_dim = k.shape[2], v.shape[3]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, H, T)
        dq = float32_zeros(q.shape, q)
        dk, dv = float32_zeros(k.shape, q), float32_zeros(v.shape, q)
        args = _bias_args(params, q)
        grads = [None if t is None else float32_zeros((t.numel(),), q) for t in params.tensors()]
        dummy = float32_zeros((1,), q)
        bm, bn = block_sizes(q)
        grid = (triton.cdiv(n_queries, bm), n_batch * n_heads)
        _bias_bwd[grid](
            q, k, v, q_pos, grad_out, lse, delta, dq, dk, dv, *args,
            *[dummy if g is None else g for g in grads],
            n_heads, n_queries, n_keys, head_dim, value_dim, 1.0 / math.sqrt(head_dim),
            CAUSAL=ctx.causal, MODE=params.mode, WIDTH=_width(params), LEAKY=params.leaky,
            BM=bm, BN=bn, DP=_pow2(head_dim), DVP=_pow2(value_dim),
        )  # fmt: skip
        bias_grads = [
            None if g is None else g.view(t.shape).to(t.dtype)
            for g, t in zip(grads, params.tensors(), strict=True)
            if t is not None
        ]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, *bias_grads


def _bias_args(params: BiasParams, like: Tensor) -> list:
    dummy = torch.zeros(1, dtype=torch.float32, device=like.device)
    table = _prepared(params.table, dummy)
    psi = _prepared(params.psi, dummy)
    n_tab = params.table.shape[-1] if params.table is not None else 1
    n_psi = params.psi.numel() if params.psi is not None else 1
    rest = [
        _prepared(t, dummy)
        for t in (params.norm_l, params.norm_r, params.w1, params.b1, params.w2, params.b2)
    ]
    return [table, n_tab, params.c_off, psi, n_psi, *rest]


def _width(params: BiasParams) -> int:
    return params.w1.numel() if params.w1 is not None else 1


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def bias_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, params: BiasParams, *, causal: bool
) -> Tensor:
    """The autograd entry: q (B, H, T, Dh), k, v (B, H, S, *), q_pos (T,) int."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    present = [t for t in params.tensors() if t is not None]
    return BiasAttentionFn.apply(q, k, v, q_pos, causal, params, *present)
