"""The data-dependent decay and non-softmax encodings (issue #33) against naive float64 references.

Each reference is restated here, entry by entry, from the official code (docs/encodings.md):
- FoX (zhixuan-lin/forgetting-transformer): ``ForgettingAttentionLayer`` with ``fgate_type="full"``
  (``fgate_proj`` a Linear(hidden, H) with bias, ``log_fgate = logsigmoid(fgate_proj(x))``) and
  ``ops/forgetting_attention.py`` (logit_ij += log_lambda_i - log_lambda_j, log_lambda the cumulative
  sum of log_fgate; causal only). The reference sums the gates between key and query one by one.
- Stick-breaking (shawntan/stickbreaking-attention): ``sb_ref.stickbreaking`` and ``sb_attn_varlen``
  (``inv_temp = 1/sqrt(Dh)``, ``attend_current=False`` by default, output ``att @ v`` without the
  remainder). The reference multiplies the sticks one by one (no logs).
- PoPE (lucidrains/PoPE-pytorch ``pope.py`` ``PoPE`` / ``apply_pope_to_qk``, x-transformers'
  ``PolarEmbedding``): in complex numbers, the reference's ``return_complex`` form.
- Selective attention (arXiv 2410.02703; no official code): the paper's listing, step by step.
- CABLE (axiomlab/Cable ``src/Cable.py``, ``CausalSelfAttention``): b = cumsum(-softplus(h_attn(x))),
  Bias_ij = b_i - b_j.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import poslab

B, H, T, DH = 2, 3, 9, 4


def _probe(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(out, inputs):
    return torch.autograd.grad((out * _probe(out.shape)).sum(), inputs)


# -- FoX ---------------------------------------------------------------------------------------------


def official_fox(q, k, v, x, weight, bias):
    """Forgetting attention, naively: D_ij = sum_{l=j+1..i} log sigmoid(w_h . x_l + b_h)."""
    log_f = F.logsigmoid(torch.einsum("btd,hd->bht", x, weight) + bias[None, :, None])  # (B, H, S)
    n_q, n_k = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    rows = []
    for a in range(n_q):
        i = n_k - n_q + a  # the query's position
        row = []
        for j in range(n_k):
            if j > i:
                row.append(torch.full_like(logits[:, :, a, j], float("-inf")))
                continue
            decay = sum((log_f[:, :, t] for t in range(j + 1, i + 1)), torch.zeros_like(log_f[:, :, 0]))
            row.append(logits[:, :, a, j] + decay)
        rows.append(torch.stack(row, dim=-1))
    return torch.softmax(torch.stack(rows, dim=-2), dim=-1) @ v


def fox64():
    enc = poslab.build_encoding("fox", n_heads=H, head_dim=DH).double()
    with torch.no_grad():  # gates well away from 1, so the decay matters
        enc.fgate.weight.normal_(0, 0.5)
        enc.fgate.bias.normal_(-1.0, 1.0)
    return enc


def test_fox_initialisation_is_the_officials():
    enc = poslab.build_encoding("fox", n_heads=16, head_dim=16)
    assert enc.fgate.weight.shape == (16, 256) and enc.fgate.bias.shape == (16,)
    assert torch.equal(enc.fgate.bias, torch.zeros(16))  # no fgate_bias_init for fgate_type="full"
    assert abs(enc.fgate.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(("name", "gate_bias"), [("fox", 5.0), ("cable", -5.0)])
def test_gate_bias_sets_where_the_gates_start(name, gate_bias):
    """``gate_bias`` (an option for studying the start, default the official 0) is the projection's
    initial bias: at an input of zeros every log gate is logsigmoid(5) = -softplus(-5) = -0.0067."""
    enc = poslab.build_encoding(f"{name}[gate_bias={gate_bias}]", n_heads=4, head_dim=8)
    assert torch.equal(enc.fgate.bias, torch.full((4,), gate_bias))
    assert f"gate_bias={gate_bias:g}" in repr(enc)
    log_gates = enc.input_keys(torch.zeros(1, 3, 32))
    torch.testing.assert_close(log_gates, torch.full((1, 4, 3, 1), -0.0067), atol=5e-5, rtol=0)
    default = poslab.build_encoding(name, n_heads=4, head_dim=8).input_keys(torch.zeros(1, 3, 32))
    torch.testing.assert_close(default, torch.full((1, 4, 3, 1), -math.log(2)))


@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("n_queries", [T, 4], ids=["full", "last-4"])
def test_fox_equals_the_official_forgetting_attention_with_gradients(impl, n_queries):
    enc = fox64()
    q = _probe((B, H, n_queries, DH), 2).requires_grad_()
    k, v = (_probe((B, H, T, DH), s).requires_grad_() for s in (3, 4))
    x = _probe((B, T, H * DH), 5).requires_grad_()
    inputs = [q, k, v, x, enc.fgate.weight, enc.fgate.bias]
    out = poslab.attend(q, k, v, enc, impl=impl, block_size=2, extra_keys=enc.input_keys(x))
    ref = official_fox(q, k, v, x, enc.fgate.weight, enc.fgate.bias)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, g_ref in zip(_grads(out, inputs), _grads(ref, inputs), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


def test_fox_with_constant_gates_is_alibi():
    """w_f = 0: every gate is sigmoid(b_h), so the bias is (i - j) log sigmoid(b_h), ALiBi's form."""
    alibi = poslab.build_encoding("alibi", n_heads=H, head_dim=DH).double()
    fox = poslab.build_encoding("fox", n_heads=H, head_dim=DH).double()
    with torch.no_grad():
        fox.fgate.weight.zero_()
        fox.fgate.bias.copy_(-torch.log(torch.expm1(alibi.slopes)))  # log sigmoid(b) = -m
    q, k, v = (_probe((B, H, T, DH), s) for s in (2, 3, 4))
    extra = fox.input_keys(_probe((B, T, H * DH), 5))
    torch.testing.assert_close(poslab.attend(q, k, v, fox, extra_keys=extra), poslab.attend(q, k, v, alibi))


def test_fox_refuses_encoders_and_a_missing_layer_input():
    enc = fox64()
    q = k = v = _probe((1, H, 5, DH))
    extra = enc.input_keys(_probe((1, 5, H * DH)))
    with pytest.raises(ValueError, match="not defined for bidirectional"):
        poslab.attend(q, k, v, enc, causal=False, extra_keys=extra)
    with pytest.raises(ValueError, match="reads the layer input"):
        poslab.attend(q, k, v, enc)


# -- stick-breaking ----------------------------------------------------------------------------------


def official_stick_breaking(q, k, v, attend_current=False):
    """w_ij = sigmoid(z_ij) prod_{j<l<i} (1 - sigmoid(z_il)) (l <= i and j <= i with attend_current),
    by products; out = w @ v, the remainder dropped."""
    n_q, n_k = q.shape[2], k.shape[2]
    beta = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    weights = torch.zeros_like(beta)
    for a in range(n_q):
        i = n_k - n_q + a
        last = i if attend_current else i - 1
        for j in range(last + 1):
            w = beta[:, :, a, j]
            for t in range(j + 1, last + 1):
                w = w * (1 - beta[:, :, a, t])
            weights[:, :, a, j] = w
    return weights @ v


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("n_queries", [T, 4], ids=["full", "last-4"])
def test_stick_breaking_equals_the_official_reference_with_gradients(attend_current, impl, n_queries):
    enc = poslab.build_encoding("stickbreaking", n_heads=H, head_dim=DH, attend_current=attend_current)
    q = (2 * _probe((B, H, n_queries, DH), 2)).requires_grad_()  # large logits: saturated sticks too
    k, v = (_probe((B, H, T, DH), s).requires_grad_() for s in (3, 4))
    out = poslab.attend(q, k, v, enc, impl=impl, block_size=3)
    ref = official_stick_breaking(q, k, v, attend_current)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, g_ref in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v]), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


def test_stick_breaking_weights_sum_to_at_most_one_and_the_first_token_sees_nothing():
    enc = poslab.build_encoding("stickbreaking", n_heads=H, head_dim=DH)
    q, k = (_probe((B, H, T, DH), s) for s in (2, 3))
    v = torch.eye(T, dtype=torch.float64).expand(B, H, T, T)  # the outputs are the weights
    w = poslab.attend(q, k, v, enc)
    assert (w >= 0).all() and (w.sum(-1) <= 1 + 1e-12).all()
    assert torch.equal(w[:, :, 0], torch.zeros_like(w[:, :, 0]))  # attend_current=False
    assert torch.equal(w.triu(), torch.zeros_like(w))  # the query's own key and the future: 0


def test_stick_breaking_is_refused_by_the_fused_path_and_in_encoders():
    enc = poslab.build_encoding("stickbreaking", n_heads=H, head_dim=DH)
    q = k = v = _probe((1, H, 5, DH))
    with pytest.raises(ValueError, match="replaces the softmax; the fused path cannot run it"):
        poslab.attend(q, k, v, enc, impl="fused")
    with pytest.raises(ValueError, match="not defined for bidirectional"):
        poslab.attend(q, k, v, enc, causal=False)


# -- PoPE --------------------------------------------------------------------------------------------


def official_pope(q, k, v, delta, dim, theta=10000.0, causal=True):
    """PoPE attention in complex numbers, as the reference's ``return_complex`` path: query channel c is
    softplus(q_c) e^{i p omega_c}, key channel c softplus(k_c) e^{i (p omega_c + delta_hc)},
    omega_c = theta^(-c/dim), delta clamped to [-2 pi, 0]; logits Re(q . conj(k)) plus the unrotated
    channels' q . k, scaled by 1/sqrt(Dh) (the head dim before doubling)."""
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[-1]
    omega = theta ** -(torch.arange(dim, dtype=torch.float64) / dim)
    q_pos = torch.arange(n_k - n_q, n_k, dtype=torch.float64)
    k_pos = torch.arange(n_k, dtype=torch.float64)
    delta = delta.clamp(-2 * math.pi, 0.0)[:, None, :]
    qc = torch.polar(F.softplus(q[..., :dim]), (q_pos[:, None] * omega).expand_as(q[..., :dim]))
    kc = torch.polar(F.softplus(k[..., :dim]), (k_pos[:, None] * omega + delta).expand_as(k[..., :dim]))
    logits = (qc @ kc.conj().transpose(-1, -2)).real + q[..., dim:] @ k[..., dim:].transpose(-1, -2)
    logits = logits / math.sqrt(head_dim)
    if causal:
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("dim", [DH, 2], ids=["full", "partial"])
@pytest.mark.parametrize("n_queries", [T, 4], ids=["full", "last-4"])
def test_pope_equals_the_official_polar_attention_with_gradients(causal, dim, n_queries):
    if not causal and n_queries != T:
        pytest.skip("encoders run full forwards only")
    enc = poslab.build_encoding("pope", n_heads=H, head_dim=DH, dim=dim, theta=100.0).double()
    with torch.no_grad():  # some phases past the clamp bounds, which must then get no gradient
        enc.phase_bias.copy_(_probe((H, dim), 6) * 4 - 3)
    q = _probe((B, H, n_queries, DH), 2).requires_grad_()
    k, v = (_probe((B, H, T, DH), s).requires_grad_() for s in (3, 4))
    inputs = [q, k, v, enc.phase_bias]
    out = poslab.attend(q, k, v, enc, causal=causal)
    ref = official_pope(q, k, v, enc.phase_bias, dim, theta=100.0, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    grads, ref_grads = _grads(out, inputs), _grads(ref, inputs)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)
    outside = (enc.phase_bias > 0) | (enc.phase_bias < -2 * math.pi)
    assert outside.any() and torch.equal(grads[-1][outside], torch.zeros_like(grads[-1][outside]))


def test_pope_defaults_are_the_references():
    enc = poslab.build_encoding("pope", n_heads=2, head_dim=8)
    assert torch.equal(enc.phase_bias, torch.zeros(2, 8)) and enc.dim == 8 and enc.theta == 10000.0
    torch.testing.assert_close(enc.inv_freqs(), 10000.0 ** -(torch.arange(8.0) / 8))  # d frequencies
    uniform = poslab.build_encoding("pope", n_heads=2, head_dim=8, bias_uniform_init=True).phase_bias
    assert (uniform <= 0).all() and (uniform >= -2 * math.pi).all() and uniform.std() > 0.5
    q = k = torch.randn(1, 2, 3, 8)
    rq, rk = enc.rotate(q, k, torch.arange(3), torch.arange(3))
    assert rq.shape == rk.shape == (1, 2, 3, 16)  # each channel becomes a (cos, sin) pair


# -- selective attention -----------------------------------------------------------------------------


def paper_selective(q, k, v, head=0):
    """The selective attention listing of the paper (section 3), step by step, on the full sequence."""
    n = q.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    s = F.relu(logits[:, head])  # the selecting head; masked entries: relu(-inf) = 0
    s = torch.cat((torch.zeros_like(s[..., :1]), s[..., 1:]), dim=-1)  # S[..., 0] = 0: never the BOS
    s = (1 - torch.eye(n, dtype=s.dtype)) * s  # never itself
    s = torch.roll(s, 1, -2)  # strictly in the future
    s = torch.cat((torch.zeros_like(s[..., :1, :]), s[..., 1:, :]), dim=-2)
    logits = logits - s.cumsum(-2)[:, None]
    return torch.softmax(logits, dim=-1) @ v


def test_selective_penalty_by_hand():
    """F_ij = sum_{j<t<i} relu(A0_tj), 0 for the first key, entry by entry."""
    q, k = _probe((1, 2, 6, DH), 2), _probe((1, 2, 6, DH), 3)
    a0 = (q @ k.transpose(-1, -2))[0, 1] / math.sqrt(DH)
    enc = poslab.build_encoding("selective", n_heads=2, head_dim=DH, head=1).double()
    pos = torch.arange(6)
    scores = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    got = -enc.logits(scores, None, q, k, k, pos, pos, causal=True, extra_keys=q)[0, 0]
    for i in range(6):
        for j in range(6):
            expected = sum(max(a0[t, j].item(), 0.0) for t in range(j + 1, i)) if j > 0 else 0.0
            assert abs(got[i, j].item() - expected) < 1e-14, (i, j)


@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("n_queries", [T, 4], ids=["full", "last-4"])
def test_selective_equals_the_papers_listing_with_gradients(impl, n_queries):
    enc = poslab.build_encoding("selective", n_heads=H, head_dim=DH).double()
    q_all = (2 * _probe((B, H, T, DH), 2)).requires_grad_()  # large logits: much is selected
    k, v = (_probe((B, H, T, DH), s).requires_grad_() for s in (3, 4))
    q = q_all[:, :, T - n_queries :]
    out = poslab.attend(q, k, v, enc, impl=impl, block_size=2, extra_keys=q_all)
    ref = paper_selective(q_all, k, v)[:, :, T - n_queries :]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, g_ref in zip(_grads(out, [q_all, k, v]), _grads(ref, [q_all, k, v]), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


def test_selective_needs_the_earlier_queries_and_refuses_encoders():
    enc = poslab.build_encoding("selective", n_heads=H, head_dim=DH)
    q, k = _probe((1, H, 2, DH)).float(), _probe((1, H, 5, DH)).float()
    with pytest.raises(ValueError, match="reads the queries of earlier positions"):
        poslab.attend(q, k, k, enc)
    with pytest.raises(ValueError, match="not defined for bidirectional"):
        poslab.attend(k, k, k, enc, causal=False)


# -- CABLE -------------------------------------------------------------------------------------------


def official_cable(q, k, v, x, weight, bias):
    """The official CausalSelfAttention's biases: b = cumsum(-softplus(h_attn(x))) along the tokens,
    Bias_ij = b_i - b_j plus the causal -inf, added to the logits (scaled by 1/sqrt(Dh) here: see
    docs/reference-differences.md)."""
    b = torch.cumsum(-F.softplus(x @ weight.t() + bias), dim=1).permute(0, 2, 1)  # (B, H, S)
    n_q, n_k = q.shape[2], k.shape[2]
    causal = torch.full((n_k, n_k), float("-inf"), dtype=q.dtype).triu(1)
    full_bias = (b.unsqueeze(3) - b.unsqueeze(2)) + causal  # (B, H, S, S)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + full_bias[:, :, n_k - n_q :]
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("impl", ["eager", "auto"])
@pytest.mark.parametrize("n_queries", [T, 4], ids=["full", "last-4"])
def test_cable_equals_the_official_biases_with_gradients(impl, n_queries):
    enc = poslab.build_encoding("cable", n_heads=H, head_dim=DH).double()
    with torch.no_grad():
        enc.fgate.weight.normal_(0, 0.5)
        enc.fgate.bias.normal_(0, 1.0)
    q = _probe((B, H, n_queries, DH), 2).requires_grad_()
    k, v = (_probe((B, H, T, DH), s).requires_grad_() for s in (3, 4))
    x = _probe((B, T, H * DH), 5).requires_grad_()
    inputs = [q, k, v, x, enc.fgate.weight, enc.fgate.bias]
    out = poslab.attend(q, k, v, enc, impl=impl, block_size=2, extra_keys=enc.input_keys(x))
    ref = official_cable(q, k, v, x, enc.fgate.weight, enc.fgate.bias)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, g_ref in zip(_grads(out, inputs), _grads(ref, inputs), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)


def test_cable_is_fox_with_negated_gate_logits_and_the_official_init():
    fox, cable = fox64(), poslab.build_encoding("cable", n_heads=H, head_dim=DH).double()
    with torch.no_grad():
        cable.fgate.weight.copy_(-fox.fgate.weight)
        cable.fgate.bias.copy_(-fox.fgate.bias)
    x = _probe((B, T, H * DH), 5)
    torch.testing.assert_close(cable.input_keys(x), fox.input_keys(x), atol=1e-14, rtol=0)
    fresh = poslab.build_encoding("cable", n_heads=16, head_dim=16)  # nanoGPT's init of h_attn
    assert torch.equal(fresh.fgate.bias, torch.zeros(16))
    assert abs(fresh.fgate.weight.std().item() - 0.02) < 0.002
