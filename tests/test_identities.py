"""Paper identities and exact forms of the baselines (docs/encodings.md)."""

from __future__ import annotations

import math

import pytest
import torch

import poslab
from poslab.encodings.alibi import alibi_slopes
from poslab.encodings.cope import CoPE
from poslab.encodings.t5 import t5_bucket


def qkv(b=2, h=4, t=10, d=8):
    return tuple(torch.randn(b, h, t, d, dtype=torch.float64) for _ in range(3))


class AllGatesOpen(CoPE):
    """CoPE with every gate forced to 1 (sigmoid(1e4) == 1 exactly in float64)."""

    def gate_logits(self, scores, q, k, v):
        return torch.full_like(scores, 1e4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cope_with_all_gates_one_is_relative_pe(causal):
    """p_ij = |i - j| + 1, so CoPE's e[p] is relative PE's r[n] with r[n] = e[n + 1] (both capped),
    in each half of the tables (keys before the query and, in an encoder, keys after it)."""
    npos = 6
    cope = AllGatesOpen(n_heads=4, head_dim=8, npos_max=npos).double()
    rel = poslab.build_encoding("relative", n_heads=4, head_dim=8, max_dist=npos - 2).double()
    with torch.no_grad():
        cope.pos_emb.normal_()
        rel.pos_emb[: npos - 1] = cope.pos_emb[1:npos]
        rel.pos_emb[npos - 1 :] = cope.pos_emb[npos + 1 :]
    q, k, v = qkv()
    torch.testing.assert_close(
        poslab.attend(q, k, v, cope, causal=causal), poslab.attend(q, k, v, rel, causal=causal)
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cope_with_zero_table_is_nope(causal):
    cope = poslab.build_encoding("cope", n_heads=4, head_dim=8).double()
    assert torch.count_nonzero(cope.pos_emb) == 0  # zero-initialised, as the paper
    q, k, v = qkv()
    torch.testing.assert_close(
        poslab.attend(q, k, v, cope, causal=causal), poslab.attend(q, k, v, None, causal=causal)
    )


def test_cope_positions_count_gates():
    """p_ij = sum_{t=j..i} g_it, read off a hand-built gate row."""
    from poslab.encodings.cope import cope_positions

    gates = torch.tensor([[[[1.0, 0.0, 1.0, 0.5, 0.0]]]]).expand(1, 1, 5, 5).tril()
    p = cope_positions(gates, torch.arange(5), causal=True)
    # Last row: gates (1, 0, 1, .5, 0): from j=0: 2.5; j=1: 1.5; j=2: 1.5; j=3: .5; j=4: 0.
    torch.testing.assert_close(p[0, 0, 4], torch.tensor([2.5, 1.5, 1.5, 0.5, 0.0]))


@pytest.mark.parametrize("base", ["alibi", "kerple_log", "fire", "t5", "rope", None])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_dape_with_zeroed_last_layer_equals_its_base(base, kernel_size):
    dape = poslab.build_encoding("dape", n_heads=4, head_dim=8, base=base, kernel_size=kernel_size).double()
    with torch.no_grad():
        dape.mlp[-1].weight.zero_()
        dape.mlp[-1].bias.zero_()
    q, k, v = qkv()
    plain = dape.base if dape.base is not None else None
    torch.testing.assert_close(poslab.attend(q, k, v, dape), poslab.attend(q, k, v, plain))


def test_dape_ablation_a_plus_b_is_its_base():
    dape = poslab.build_encoding("dape", n_heads=4, head_dim=8, base="kerple_log", form="A+B").double()
    assert dape.mlp is None
    q, k, v = qkv()
    torch.testing.assert_close(poslab.attend(q, k, v, dape), poslab.attend(q, k, v, dape.base))


def test_dape_ablation_a_plus_f_of_nothing_is_nope():
    # Without a base B = 0, so f(B) is one constant per head: softmax drops it, whatever the MLP.
    dape = poslab.build_encoding("dape", n_heads=4, head_dim=8, base=None, form="A+f(B)").double()
    nope = poslab.build_encoding("nope", n_heads=4, head_dim=8)
    q, k, v = qkv()
    for causal in (True, False):
        out = poslab.attend(q, k, v, dape, causal=causal)
        assert out.shape == q.shape
        torch.testing.assert_close(out, poslab.attend(q, k, v, nope, causal=causal))


def test_dape_mlp_is_the_papers_pointwise_mlp():
    dape = poslab.build_encoding("dape", n_heads=8, head_dim=16, width=32)
    lin1, act, lin2 = dape.mlp
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (16, 32, 8)
    assert isinstance(act, torch.nn.LeakyReLU) and act.negative_slope == 0.01


def test_alibi_slopes_8_and_12_heads():
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]
    assert alibi_slopes(12) == [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]


def test_alibi_bias_is_the_true_relative_matrix():
    alibi = poslab.build_encoding("alibi", n_heads=8, head_dim=4)
    pos = torch.arange(6)
    b = alibi.bias(pos, pos, causal=False)
    assert b[0, 5, 2].item() == pytest.approx(-0.5 * (3 - 0.5))  # a key on the left: half a step closer
    assert b[7, 1, 4].item() == pytest.approx(-(2**-8) * 3)


def test_t5_buckets():
    n = torch.arange(0, 400)
    expected = [
        i if i < 16 else min(31, 16 + int(math.log(i / 16) / math.log(128 / 16) * 16)) for i in range(400)
    ]
    assert t5_bucket(n).tolist() == expected
    assert t5_bucket(torch.tensor([15, 16, 22, 127, 128, 10_000])).tolist() == [
        15,
        16,
        18,
        31,
        31,
        31,
    ]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scaling": "linear", "factor": 4.0},
        {"scaling": "ntk", "factor": 4.0},
        {"scaling": "yarn", "factor": 4.0, "original_max_len": 64},
    ],
    ids=["plain", "linear", "ntk", "yarn"],
)
def test_rope_logits_depend_only_on_relative_position(options):
    rope = poslab.build_encoding("rope", n_heads=2, head_dim=16, **options).double()
    q, k, _ = qkv(h=2, t=8, d=16)
    pos = torch.arange(8)

    def logits(shift):
        qr, kr = rope.rotate(q, k, pos + shift, pos + shift)
        return qr @ kr.transpose(-1, -2)

    torch.testing.assert_close(logits(0), logits(37))
    torch.testing.assert_close(logits(0), logits(1000))
    assert not torch.allclose(logits(0), q @ k.transpose(-1, -2))  # it does rotate


def test_rope_angle_table_equals_direct_angles():
    """The cached cos/sin table gives exactly the angles computed from the positions, as it grows
    and after the module changes dtype."""
    rope = poslab.build_encoding("rope", n_heads=2, head_dim=16, scaling="yarn", factor=4.0)
    for positions in (torch.arange(5), torch.tensor([3, 900, 7]), torch.arange(2000, 2003)):
        direct = rope._angles(positions, rope.inv_freq, rope.mscale)
        for got, want in zip(rope._cos_signed_sin(positions), direct, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        # the public (cos, sin), against the textbook formula (float32 angles: ~1e-5 off at 2000)
        theta = positions.double()[:, None] * rope.inv_freq.double()[None, :]
        cos, sin = rope.angles(positions)
        tol = {"atol": 1e-4, "rtol": 0}
        torch.testing.assert_close(cos.double(), (theta.cos() * rope.mscale).repeat(1, 2), **tol)
        torch.testing.assert_close(sin.double(), (theta.sin() * rope.mscale).repeat(1, 2), **tol)
    assert rope._table[0].shape[0] >= 2003
    rope.double()
    cos, _ = rope.angles(torch.arange(3))
    assert cos.dtype == torch.float64
    direct = rope._angles(torch.arange(3), rope.inv_freq, rope.mscale)[0]
    torch.testing.assert_close(cos, direct, atol=0, rtol=0)


def test_rope_rotation_is_the_textbook_formula():
    """x cos + rotate_half(x) sin, with rotate_half(x1, x2) = (-x2, x1), for q and k at different
    and at the same positions (the shared-angle shortcut)."""
    rope = poslab.build_encoding("rope", n_heads=2, head_dim=8).double()
    q, k = torch.randn(2, 2, 6, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def textbook(x, positions):
        theta = positions.double()[:, None] * rope.inv_freq.double()[None, :]
        cos, sin = theta.cos().repeat(1, 2), theta.sin().repeat(1, 2)
        return x * cos + rotate_half(x) * sin

    for q_pos, k_pos in ((torch.arange(6), torch.arange(6)), (torch.arange(6) + 3, torch.arange(6))):
        got_q, got_k = rope.rotate(q, k, q_pos, k_pos)
        torch.testing.assert_close(got_q, textbook(q, q_pos))
        torch.testing.assert_close(got_k, textbook(k, k_pos))


def test_rope_scalings_reduce_to_plain_rope_at_factor_one():
    plain = poslab.build_encoding("rope", n_heads=2, head_dim=16)
    for scaling in ("linear", "ntk", "yarn", "dynamic", "llama3"):
        scaled = poslab.build_encoding("rope", n_heads=2, head_dim=16, scaling=scaling, factor=1.0)
        torch.testing.assert_close(scaled.inv_freq, plain.inv_freq)
        assert scaled.mscale == 1.0


def test_rope_linear_interpolation_divides_positions():
    plain = poslab.build_encoding("rope", n_heads=1, head_dim=8)
    linear = poslab.build_encoding("rope", n_heads=1, head_dim=8, scaling="linear", factor=4.0)
    x = torch.randn(1, 1, 5, 8)
    pos = torch.arange(0, 20, 4)
    torch.testing.assert_close(linear.apply(x, pos), plain.apply(x, pos // 4))


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    plain = poslab.build_encoding("rope", n_heads=1, head_dim=64)
    yarn = poslab.build_encoding(
        "rope", n_heads=1, head_dim=64, scaling="yarn", factor=8.0, original_max_len=2048
    )
    ratio = yarn.inv_freq / plain.inv_freq
    assert ratio[0].item() == pytest.approx(1.0)  # many turns in the context: untouched
    assert ratio[-1].item() == pytest.approx(1 / 8)  # less than one turn: interpolated
    assert yarn.mscale == pytest.approx(0.1 * math.log(8) + 1)


def test_kerple_forms():
    log = poslab.build_encoding("kerple_log", n_heads=2, head_dim=4)
    power = poslab.build_encoding("kerple_power", n_heads=2, head_dim=4)
    with torch.no_grad():
        log.r1[0].copy_(torch.tensor([1.5, 0.001]))  # the second is clamped to 1e-2
        log.r2[0].copy_(torch.tensor([0.5, 0.2]))
        power.a[0].copy_(torch.tensor([0.5, 1.0]))
        power.p[0].copy_(torch.tensor([1.5, 3.0]))  # p is clamped to 2
    pos = torch.arange(5)
    bl, bp = log.bias(pos, pos, causal=True), power.bias(pos, pos, causal=True)
    assert bl[0, 4, 1].item() == pytest.approx(-1.5 * math.log(1 + 0.5 * 3))
    assert bl[1, 4, 0].item() == pytest.approx(-0.01 * math.log(1 + 0.2 * 4))
    assert bp[0, 4, 0].item() == pytest.approx(-0.5 * 4**1.5)
    assert bp[1, 3, 0].item() == pytest.approx(-1.0 * 3**2)


def test_fire_input_is_normalised_by_query_position():
    fire = poslab.build_encoding("fire", n_heads=2, head_dim=4, threshold=4.0)
    with torch.no_grad():  # make f the identity on its scalar input, for both heads
        fire.mlp[0].weight.fill_(1.0)
        fire.mlp[0].bias.zero_()
        fire.mlp[2].weight.zero_()
        fire.mlp[2].weight[:, 0] = 1.0
        fire.mlp[2].bias.zero_()
    pos = torch.arange(12)
    b = fire.bias(pos, pos, causal=True)
    psi = lambda x: math.log(0.1 * x + 1)  # noqa: E731
    assert b[0, 10, 3].item() == pytest.approx(psi(7) / psi(10), rel=1e-5)
    assert b[1, 2, 0].item() == pytest.approx(psi(2) / psi(4), rel=1e-5)  # threshold L = 4 > i


def test_sandwich_is_a_sinusoid_inner_product():
    s = poslab.build_encoding("sandwich", n_heads=2, head_dim=4, dim=8)
    pos = torch.arange(6)
    b = s.bias(pos, pos, causal=True)
    assert torch.all(b[:, torch.arange(6), torch.arange(6)] == 0)  # diagonal: d'/2 - d'/2
    n, h = 5, 0
    ratio = 8 * (h + 1) / 2
    expected = sum(math.cos(n / (ratio * 10000 ** (2 * k / 8))) for k in range(4)) - 4
    assert b[h, 5, 0].item() == pytest.approx(expected, rel=1e-5)


def test_sinusoidal_table_values():
    from poslab.encodings.sinusoidal import sinusoid_table

    table = sinusoid_table(torch.arange(3), 4)
    assert table[2, 0].item() == pytest.approx(math.sin(2))
    assert table[2, 1].item() == pytest.approx(math.cos(2))
    assert table[2, 2].item() == pytest.approx(math.sin(2 / 100))


def test_sinusoidal_embed_adds_the_table_and_scales_the_embeddings_on_request():
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    pos = torch.arange(3, 8)
    table = torch.tensor(
        [
            [
                f(p / 10000 ** (2 * (c // 2) / 6))
                for c, f in zip(range(6), (math.sin, math.cos) * 3, strict=True)
            ]
            for p in range(3, 8)
        ],
        dtype=torch.float64,
    )
    plain = poslab.build_encoding("sinusoidal", n_heads=2, head_dim=3).double()
    scaled = poslab.build_encoding("sinusoidal[scale_embeddings=true]", n_heads=2, head_dim=3).double()
    torch.testing.assert_close(plain.embed(x, pos), x + table)
    torch.testing.assert_close(scaled.embed(x, pos), x * math.sqrt(6) + table)
    # the gradient reaches the embeddings scaled by sqrt(d)
    x.requires_grad_(True)
    scaled.embed(x, pos).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, math.sqrt(6)))


def test_composition_sums_biases_and_rewrites_logits():
    """cope+alibi equals CoPE's logits plus ALiBi's bias, computed by hand."""
    comp = poslab.build_encoding("cope+alibi", n_heads=4, head_dim=8, npos_max=8).double()
    with torch.no_grad():
        comp.parts[0].pos_emb.normal_()
    q, k, v = qkv()
    pos = torch.arange(10)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    expected = comp.parts[0].logits(scores, None, q, k, v, pos, pos, causal=True)
    expected = expected + comp.parts[1].bias(pos, pos, causal=True)
    got = comp.logits(scores, comp.bias(pos, pos, causal=True), q, k, v, pos, pos, causal=True)
    torch.testing.assert_close(got, expected)


def test_composition_routes_options():
    comp = poslab.build_encoding("cope+rope", n_heads=2, head_dim=8, npos_max=5, rope={"base": 500.0})
    assert comp.parts[0].npos_max == 5 and comp.parts[1].base == 500.0
    spec = poslab.build_encoding("dape[base=kerple_log,width=8,kernel_size=3]", n_heads=2, head_dim=8)
    assert spec.width == 8 and spec.kernel_size == 3 and spec.base.name == "kerple_log"
