"""Reference tests: CoPE and DAPE against naive float64 loops written from the papers' equations.

Each naive function below is written from docs/attention.md, loop by loop, independently of
the library's vectorised code; forward outputs and gradients (inputs and parameters) must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

import poslab
from poslab.encodings.alibi import alibi_slopes

B, H, T, DH = 2, 3, 7, 4


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def softmax_rows(logits: list[list[torch.Tensor]], visible) -> list[list[torch.Tensor]]:
    out = []
    for i, row in enumerate(logits):
        js = [j for j in range(len(row)) if visible(i, j)]
        m = max(row[j].detach() for j in js)
        exps = {j: torch.exp(row[j] - m) for j in js}
        total = sum(exps.values())
        out.append(
            [exps[j] / total if j in exps else torch.zeros((), dtype=torch.float64) for j in range(len(row))]
        )
    return out


def naive_attention(logit_fn, v, causal):
    """out[b, h, i] = sum_j softmax_j(logit_fn(b, h, i, j)) v[b, h, j], by explicit loops."""
    n = v.shape[2]
    visible = (lambda i, j: j <= i) if causal else (lambda i, j: True)
    rows = []
    for b in range(v.shape[0]):
        heads = []
        for h in range(v.shape[1]):
            logits = [[logit_fn(b, h, i, j) if visible(i, j) else None for j in range(n)] for i in range(n)]
            probs = softmax_rows(logits, visible)
            heads.append(torch.stack([sum(probs[i][j] * v[b, h, j] for j in range(n)) for i in range(n)]))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def naive_cope(q, k, v, table, *, causal, gate_keys=None, gate_values=False):
    """``table`` holds npos rows for keys at or before the query, then npos for keys after it."""
    npos = table.shape[0] // 2
    scale = math.sqrt(q.shape[-1])

    def gate(b, h, i, t):
        key = v[b, h, t] if gate_values else k[b, h, t]
        if gate_keys is not None:
            key = gate_keys[b, h, t]
        return torch.sigmoid(q[b, h, i] @ key / scale)

    def logit(b, h, i, j):
        lo, hi = (j, i) if j <= i else (i, j)
        p = sum(gate(b, h, i, t) for t in range(lo, hi + 1))
        p = torch.clamp(p, max=npos - 1)
        f = math.floor(p.item())
        c = math.ceil(p.item())
        w = p - f
        side = table[npos:] if j > i else table[:npos]
        e = side[f] * (1 - w) + side[c] * w
        return (q[b, h, i] @ k[b, h, j] + q[b, h, i] @ e) / scale

    return naive_attention(logit, v, causal)


def grads(out, tensors, probe):
    return torch.autograd.grad((out * probe).sum(), tensors)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("variant", ["plain", "sep_key", "val_gates"])
def test_cope_matches_naive_float64(causal, variant):
    npos = 4  # below T, so the clamp is exercised
    enc = poslab.build_encoding(
        "cope",
        n_heads=H,
        head_dim=DH,
        npos_max=npos,
        sep_key=variant == "sep_key",
        val_gates=variant == "val_gates",
    ).double()
    with torch.no_grad():
        enc.pos_emb.normal_()
    q, k, v = rand(B, H, T, DH), rand(B, H, T, DH), rand(B, H, T, DH)
    gate_keys = rand(B, H, T, DH) if variant == "sep_key" else None  # what the input_keys hook makes
    out = poslab.attend(q, k, v, enc, causal=causal, extra_keys=gate_keys)
    ref = naive_cope(
        q,
        k,
        v,
        enc.pos_emb,
        causal=causal,
        gate_keys=gate_keys,
        gate_values=variant == "val_gates",
    )
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    params = [q, k, v, enc.pos_emb] + ([gate_keys] if variant == "sep_key" else [])
    probe = torch.randn_like(out)
    for g, g_ref in zip(grads(out, params, probe), grads(ref, params, probe), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


def naive_dape(q, k, v, enc, causal):
    """A + B + f([A; B]) with f applied by hand from the module's weights (v1 MLP or V2 convs); for
    the ablations, f reads B alone (A + f(B)) or the logit drops B (A + f(A, B))."""
    scale = math.sqrt(q.shape[-1])
    n = q.shape[2]
    slopes = torch.tensor(alibi_slopes(q.shape[1]), dtype=torch.float64)

    def a(b, h, i, j):
        return q[b, h, i] @ k[b, h, j] / scale

    def bias(h, i, j):
        if causal:
            return -slopes[h] * max(i - j, 0)
        return -slopes[h] * abs(i - j) + (0.5 * slopes[h] if j < i else 0.0)  # keys on the left: +m/2

    channels = 2 * q.shape[1] if enc.reads_logits else q.shape[1]

    def features(b, i, j):
        """The 2H channels [A; B] (H channels B for A + f(B)) at (i, j); causal V2 sees zeros in the
        future."""
        if causal and enc.kernel_size > 1 and (j > i or j < 0):
            return torch.zeros(channels, dtype=torch.float64)
        if j < 0 or j >= n:  # convolution zero padding
            return torch.zeros(channels, dtype=torch.float64)
        logits = [a(b, h, i, j) for h in range(q.shape[1])] if enc.reads_logits else []
        return torch.stack(logits + [bias(h, i, j) for h in range(q.shape[1])])

    leaky = torch.nn.functional.leaky_relu
    if enc.kernel_size == 1:
        lin1, _, lin2 = enc.mlp

        def f(b, i, j):
            return lin2.weight @ leaky(lin1.weight @ features(b, i, j) + lin1.bias, 0.01) + lin2.bias
    else:
        conv1, _, conv2 = enc.mlp
        r = enc.kernel_size // 2

        def hidden(b, i, j):
            if j < 0 or j >= n or (causal and j > i):
                return torch.zeros(conv1.out_channels, dtype=torch.float64)
            acc = conv1.bias.clone()
            for o in range(-r, r + 1):
                acc = acc + conv1.weight[:, :, 0, o + r] @ features(b, i, j + o)
            return leaky(acc, 0.01)

        def f(b, i, j):
            acc = conv2.bias.clone()
            for o in range(-r, r + 1):
                acc = acc + conv2.weight[:, :, 0, o + r] @ hidden(b, i, j + o)
            return acc

    cache: dict = {}

    def logit(b, h, i, j):
        if (b, i, j) not in cache:
            cache[(b, i, j)] = f(b, i, j)
        return a(b, h, i, j) + (bias(h, i, j) if enc.add_base else 0.0) + cache[(b, i, j)][h]

    return naive_attention(logit, v, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "kernel_size, form",
    [(1, "A+B+f(A,B)"), (3, "A+B+f(A,B)"), (1, "A+f(A,B)"), (1, "A+f(B)"), (3, "A+f(B)")],
    ids=["v1", "v2", "v1-A+f(A,B)", "v1-A+f(B)", "v2-A+f(B)"],
)
def test_dape_alibi_matches_naive_float64(kernel_size, form, causal):
    enc = poslab.build_encoding(
        "dape", n_heads=H, head_dim=DH, base="alibi", width=5, kernel_size=kernel_size, form=form
    ).double()
    q, k, v = rand(B, H, 5, DH), rand(B, H, 5, DH), rand(B, H, 5, DH)
    out = poslab.attend(q, k, v, enc, causal=causal)
    ref = naive_dape(q, k, v, enc, causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    params = [q, k, v, *enc.mlp.parameters()]
    probe = torch.randn_like(out)
    for g, g_ref in zip(grads(out, params, probe), grads(ref, params, probe), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
