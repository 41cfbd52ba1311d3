"""The bias encodings against their reference implementations (issue: match the references).

Each reference formula is restated here from the public code and the papers, in float64:
- ALiBi in encoders: the randomized positional encodings code (Ruoss et al., arXiv 2305.16843) gives
  keys on the left of the query (j < i) +m/2, so left and right differ.
- T5 in encoders: Hugging Face's ``_relative_position_bucket(bidirectional=True)``, half of the
  buckets per direction, keys after the query in the upper half.
- Kerple: the official code clamps the stored parameters, and gradients flow (arXiv 2205.09921).
- FIRE: the official code (the DAPE repository): psi(x) = log(|c x| + 1), L = |s * L0|, eps = 1e-6,
  ReLU in plain FIRE, LeakyReLU in DAPE-FIRE, L0 half the training length.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import poslab
from poslab.encodings.alibi import alibi_slopes
from poslab.encodings.t5 import t5_bucket
from poslab.lab.config import ModelSpec, RunConfig, TaskConfig

BIDIRECTIONAL_BIASES = ["alibi", "t5", "kerple_log", "kerple_power", "fire", "sandwich"]


def build(name: str, n_heads: int = 4, **options) -> poslab.PositionEncoding:
    return poslab.build_encoding(name, n_heads=n_heads, head_dim=8, **options)


# -- every bidirectional bias tells left from right -------------------------------------------------


@pytest.mark.parametrize("name", BIDIRECTIONAL_BIASES + ["dape[base=fire]", "dape[base=kerple_log]"])
def test_encoder_bias_tells_the_key_on_the_left_from_the_key_on_the_right(name):
    enc = build(name).double()
    pos = torch.arange(12)
    if enc.uses_logits:  # DAPE: the logits with zero scores, so only the position terms differ
        scores = torch.zeros(1, 4, 12, 12, dtype=torch.float64)
        q = k = v = torch.zeros(1, 4, 12, 8, dtype=torch.float64)
        out = enc.logits(scores, enc.bias(pos, pos, causal=False), q, k, v, pos, pos, causal=False)[0]
    else:
        out = enc.bias(pos, pos, causal=False)
    for i in (1, 5, 10):
        left, right = out[:, i, i - 1], out[:, i, i + 1]
        assert ((left - right).abs() > 1e-6).all(), f"query {i}: left {left} vs right {right}"


# -- ALiBi -------------------------------------------------------------------------------------------


def randomized_pe_alibi(n_heads: int, length: int) -> torch.Tensor:
    """The encoder ALiBi of the randomized positional encodings code, entry by entry: -m |i - j|,
    plus m/2 on the strict lower triangle (keys before the query)."""
    out = torch.zeros(n_heads, length, length, dtype=torch.float64)
    for h, m in enumerate(alibi_slopes(n_heads)):
        for i in range(length):
            for j in range(length):
                out[h, i, j] = -m * abs(i - j) + (0.5 * m if j < i else 0.0)
    return out


@pytest.mark.parametrize("n_heads", [4, 12])
def test_alibi_encoder_bias_is_the_randomized_pe_form(n_heads):
    enc = build("alibi", n_heads=n_heads).double()
    pos = torch.arange(9)
    expected = randomized_pe_alibi(n_heads, 9)
    torch.testing.assert_close(enc.bias(pos, pos, causal=False), expected, atol=0, rtol=1e-15)
    # Offset queries (a query block) get the matching rows.
    torch.testing.assert_close(enc.bias(pos[5:], pos, causal=False), expected[:, 5:], atol=0, rtol=1e-15)


def test_alibi_causal_bias_is_unchanged():
    enc = build("alibi", n_heads=8).double()
    pos = torch.arange(6)
    slopes = torch.tensor(alibi_slopes(8), dtype=torch.float64)
    expected = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).clamp(min=0).double()
    torch.testing.assert_close(enc.bias(pos, pos, causal=True), expected, atol=0, rtol=1e-15)


@pytest.mark.parametrize("n_heads", [3, 8, 12, 16, 24, 64])
def test_alibi_slopes_are_float64_exact_after_double(n_heads):
    """The slopes of a float64 module are 2^e in float64 (float32 values widened were 4.6e-9 off)."""
    enc = build("alibi", n_heads=n_heads).double()
    slopes = enc.slopes
    assert slopes.dtype == torch.float64
    expected = torch.tensor([2.0**e for e in _alibi_exponents_by_hand(n_heads)], dtype=torch.float64)
    assert ((slopes - expected).abs() / expected).max().item() <= 2 * 2.0**-53
    pos = torch.arange(5)
    assert enc.bias(pos, pos, causal=True).dtype == torch.float64


def _alibi_exponents_by_hand(n_heads: int) -> list[float]:
    """Press et al.'s slopes as exponents of 2: -8k/H for a power of two; otherwise the nearest lower
    power of two's, then the odd-numbered ones of twice that size."""
    lower = 2 ** int(math.log2(n_heads))
    if lower == n_heads:
        return [-8 * k / n_heads for k in range(1, n_heads + 1)]
    return [-8 * k / lower for k in range(1, lower + 1)] + [
        -8 * k / (2 * lower) for k in range(1, 2 * lower, 2)
    ][: n_heads - lower]


# -- T5 ----------------------------------------------------------------------------------------------


def hf_bucket(relative_position: int, *, bidirectional: bool, n_buckets: int = 32, max_distance: int = 128):
    """Hugging Face's T5 bucket of ``relative_position`` = key - query, re-derived from its docstring
    and code: in an encoder each sign of the relative position owns half the buckets (positive, i.e.
    keys after the query, the upper half); a decoder only sees keys at or before the query. Within a
    half, magnitudes below half of it are exact, larger ones log-spaced up to max_distance."""
    offset = 0
    if bidirectional:
        n_buckets //= 2
        if relative_position > 0:
            offset = n_buckets
        magnitude = abs(relative_position)
    else:
        magnitude = max(-relative_position, 0)
    exact = n_buckets // 2
    if magnitude < exact:
        return offset + magnitude
    log_part = int(math.log(magnitude / exact) / math.log(max_distance / exact) * (n_buckets - exact))
    return offset + min(exact + log_part, n_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize(("n_buckets", "max_distance"), [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_equal_hugging_face(bidirectional, n_buckets, max_distance):
    n = torch.arange(-300, 301)  # query - key
    got = t5_bucket(n, n_buckets=n_buckets, max_distance=max_distance, bidirectional=bidirectional)
    expected = [
        hf_bucket(-d, bidirectional=bidirectional, n_buckets=n_buckets, max_distance=max_distance)
        for d in n.tolist()
    ]
    assert got.tolist() == expected


def test_t5_encoder_bucket_layout_by_hand():
    # key - query:              -200 -9 -8 -7 -1  0   1   7   8   9  200
    rel = torch.tensor([-200, -9, -8, -7, -1, 0, 1, 7, 8, 9, 200])
    got = t5_bucket(-rel, bidirectional=True).tolist()
    assert got == [15, 8, 8, 7, 1, 0, 17, 23, 24, 24, 31]


def test_t5_encoder_bias_reads_the_table_at_the_hugging_face_bucket():
    enc = build("t5").double()
    pos = torch.arange(40)
    b = enc.bias(pos[30:], pos, causal=False)
    for i in range(30, 40):
        for j in range(40):
            torch.testing.assert_close(b[:, i - 30, j], enc.table[hf_bucket(j - i, bidirectional=True)])


# -- Kerple ------------------------------------------------------------------------------------------


def test_kerple_initial_distributions_follow_the_official_code():
    torch.manual_seed(0)
    log, power = build("kerple_log", n_heads=4096), build("kerple_power", n_heads=4096)
    for param, high in ((log.r1, 2.0), (log.r2, 1.0), (power.a, 1.0), (power.p, 2.0)):
        assert param.min().item() >= 0 and param.max().item() < high
        assert param.mean().item() == pytest.approx(high / 2, abs=0.03)


@pytest.mark.parametrize(
    ("name", "param", "value", "bound", "inside"),
    [
        ("kerple_log", "r1", -0.5, 1e-2, 0.5),
        ("kerple_log", "r2", 0.001, 1e-2, 0.5),
        ("kerple_power", "a", -1.0, 1e-2, 0.5),
        ("kerple_power", "p", 3.0, 2.0, 1.0),
        ("kerple_power", "p", 0.0, 1e-2, 1.0),
    ],
)
def test_kerple_parameter_past_its_bound_gets_a_gradient_and_recovers(name, param, value, bound, inside):
    """The official projection: the stored value is clamped, the gradient is the unclamped one, so
    training can bring a parameter back from its bound (a clamp in the formula gives it zero gradient).
    The parameter is head 1 of the causal (first) set."""
    enc = build(name).double()
    target_enc = build(name).double()
    target_enc.load_state_dict(enc.state_dict())
    getattr(target_enc, param).data.view(-1)[1] = inside
    pos = torch.arange(8)
    target = target_enc.bias(pos, pos, causal=True).detach()

    tensor = getattr(enc, param)
    tensor.data.view(-1)[1] = value
    bias = enc.bias(pos, pos, causal=True)
    grad = torch.autograd.grad(((bias - target) ** 2).sum(), tensor)[0]
    assert grad.view(-1)[1].item() != 0.0
    assert tensor.view(-1)[1].item() == pytest.approx(bound)  # projected before use

    optimizer = torch.optim.Adam([tensor], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        ((enc.bias(pos, pos, causal=True) - target) ** 2).sum().backward()
        optimizer.step()
    assert tensor.view(-1)[1].item() == pytest.approx(inside, abs=0.1)


def test_kerple_projection_leaves_autograd_usable_across_calls():
    """Several bias calls in one graph (query blocks) and a backward: no in-place error."""
    enc = build("kerple_power").double()
    pos = torch.arange(8)
    total = enc.bias(pos[:4], pos, causal=True).sum() + enc.bias(pos[4:], pos, causal=True).sum()
    total.backward()
    assert torch.isfinite(enc.a.grad).all() and torch.isfinite(enc.p.grad).all()


def test_kerple_forms_per_direction():
    log, power = build("kerple_log", n_heads=2).double(), build("kerple_power", n_heads=2).double()
    with torch.no_grad():
        log.r1.copy_(torch.tensor([[1.5, 0.7], [0.3, 2.0]], dtype=torch.float64))
        log.r2.copy_(torch.tensor([[0.5, 0.2], [0.9, 0.1]], dtype=torch.float64))
        power.a.copy_(torch.tensor([[0.5, 1.0], [0.25, 0.1]], dtype=torch.float64))
        power.p.copy_(torch.tensor([[1.5, 1.0], [0.5, 2.0]], dtype=torch.float64))
    pos = torch.arange(6)
    for causal in (True, False):
        bl, bp = log.bias(pos, pos, causal=causal), power.bias(pos, pos, causal=causal)
        assert bl[0, 4, 1].item() == pytest.approx(-1.5 * math.log(1 + 0.5 * 3), rel=1e-14)
        assert bp[1, 5, 0].item() == pytest.approx(-1.0 * 5**1.0, rel=1e-14)
    bl, bp = log.bias(pos, pos, causal=False), power.bias(pos, pos, causal=False)
    assert bl[1, 1, 4].item() == pytest.approx(-2.0 * math.log(1 + 0.1 * 3), rel=1e-14)  # key on the right
    assert bp[0, 0, 5].item() == pytest.approx(-0.25 * 5**0.5, rel=1e-14)


# -- FIRE --------------------------------------------------------------------------------------------


def official_fire(enc, q_pos, k_pos, activation):
    """The official causal FIRE, restated: psi(x) = log(|c x| + 1), L = |s * L0|, normaliser
    psi(max(i, L)) + 1e-6, the MLP's hidden activation as given. Future entries take distance 0."""
    c = enc.c
    threshold = (enc.threshold_scale * enc.init_threshold).abs()
    i = q_pos.double()[:, None]
    dist = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).double()
    norm = torch.log(torch.abs(c * torch.maximum(i, threshold)) + 1) + 1e-6
    x = (torch.log(torch.abs(c * dist) + 1) / norm)[..., None]
    first, last = enc.mlp[0], enc.mlp[2]
    hidden = x @ first.weight.T + first.bias
    hidden = F.relu(hidden) if activation == "relu" else F.leaky_relu(hidden, 0.01)
    return (hidden @ last.weight.T + last.bias).permute(2, 0, 1)


def test_fire_equals_the_official_fire_with_gradients():
    enc = build("fire", threshold=6.0).double()
    with torch.no_grad():  # a negative c and a negative multiplier: both enter through |.|
        enc.c.fill_(-0.3)
        enc.threshold_scale.fill_(-1.5)
    pos = torch.arange(14)
    got = enc.bias(pos[4:], pos, causal=True)
    ref = official_fire(enc, pos[4:], pos, "relu")
    torch.testing.assert_close(got, ref, atol=1e-13, rtol=1e-12)
    params = [enc.c, enc.threshold_scale, *enc.mlp.parameters()]
    probe = torch.randn_like(got)
    grads = torch.autograd.grad(got, params, probe)
    ref_grads = torch.autograd.grad(ref, params, probe)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)
    assert grads[1].item() != 0.0  # L = 9 exceeds the early queries' positions: s is learned


def test_fire_activation_and_dape_fire_default():
    assert isinstance(build("fire").mlp[1], torch.nn.ReLU)
    leaky = build("dape[base=fire]").base.mlp[1]
    assert isinstance(leaky, torch.nn.LeakyReLU) and leaky.negative_slope == 0.01
    assert isinstance(build("dape[base=fire[activation=relu]]").base.mlp[1], torch.nn.ReLU)
    assert isinstance(
        build("dape", base="fire", base_options={"activation": "relu"}).base.mlp[1], torch.nn.ReLU
    )
    with pytest.raises(ValueError, match="fire activation must be one of relu, leaky_relu, got 'gelu'"):
        build("fire", activation="gelu")


def test_dape_fire_equals_the_official_dape_fire():
    """A + B + f([A; B]) with B the official FIRE bias (LeakyReLU inside), causal, in float64."""
    enc = poslab.build_encoding("dape", n_heads=2, head_dim=4, base="fire", width=6).double()
    q, k, v = (torch.randn(2, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    out = poslab.attend(q, k, v, enc, causal=True)
    pos = torch.arange(7)
    a = q @ k.transpose(-1, -2) / 2.0
    b = official_fire(enc.base, pos, pos, "leaky_relu").expand_as(a)
    first, last = enc.mlp[0], enc.mlp[2]
    features = torch.cat((a, b), dim=1).permute(0, 2, 3, 1)
    mixed = F.leaky_relu(features @ first.weight.T + first.bias, 0.01) @ last.weight.T + last.bias
    logits = a + b + mixed.permute(0, 3, 1, 2)
    logits = logits.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    torch.testing.assert_close(out, logits.softmax(-1) @ v, atol=1e-12, rtol=1e-10)


def test_fire_threshold_defaults():
    assert build("fire").init_threshold.item() == 256.0  # the official class's default (512, halved)
    assert build("fire", train_len=128).init_threshold.item() == 64.0
    assert build("fire", train_len=101).init_threshold.item() == 50.0
    assert build("fire", train_len=128, threshold=10.0).init_threshold.item() == 10.0
    assert build("dape[base=fire]", train_len=128).base.init_threshold.item() == 64.0
    assert build("dape[base=fire[threshold=5]]", train_len=128).base.init_threshold.item() == 5.0
    fire = build("fire", train_len=128)
    assert fire.threshold.item() == 64.0 and fire.threshold_scale.item() == 1.0


@pytest.mark.parametrize(
    ("encoding", "path"), [("fire", ""), ("dape[base=fire]", "base"), ("fire+rope", "parts.0")]
)
def test_a_run_ties_the_fire_threshold_to_its_training_length(encoding, path):
    config = RunConfig(task=TaskConfig(name="flipflop", train_len=48), model=ModelSpec(encoding=encoding))
    module = config.model_config(config.task.build()).build_encoding()
    fire = module.get_submodule(path) if path else module
    assert fire.init_threshold.item() == 24.0
    assert (
        poslab.ModelConfig(vocab_size=5, encoding=encoding)
        .build_encoding()
        .get_submodule(path)
        .init_threshold.item()
        == 256.0
    )


def test_fire_encoder_form():
    """Keys on the right get the negated input, normalised by the farthest key on the right."""
    enc = build("fire", n_heads=2, threshold=3.0).double()
    with torch.no_grad():  # f = the identity on its scalar input, for both heads; c = 0.1 in float64
        enc.c.fill_(0.1)
        enc.mlp[0].weight.copy_(torch.tensor([[1.0], [-1.0]] + [[0.0]] * 30))
        enc.mlp[0].bias.zero_()
        enc.mlp[2].weight.zero_()
        enc.mlp[2].weight[:, 0], enc.mlp[2].weight[:, 1] = 1.0, -1.0
        enc.mlp[2].bias.zero_()
    pos = torch.arange(12)
    b = enc.bias(pos, pos, causal=False)

    def psi(x):
        return math.log(0.1 * x + 1)

    assert b[0, 8, 2].item() == pytest.approx(psi(6) / (psi(8) + 1e-6), rel=1e-13)  # left: max(i, L) = 8
    assert b[0, 8, 10].item() == pytest.approx(-psi(2) / (psi(3) + 1e-6), rel=1e-13)  # right: max(3, L)
    assert b[0, 1, 9].item() == pytest.approx(-psi(8) / (psi(10) + 1e-6), rel=1e-13)  # right: S-1-i = 10
    causal = enc.bias(pos, pos, causal=True)
    assert causal[0, 8, 2].item() == b[0, 8, 2].item()


# -- Sandwich ----------------------------------------------------------------------------------------


def sandwich_by_hand(h: int, n_heads: int, dim: int, d: float) -> float:
    ratio = 8 * (h + 1) / n_heads
    return sum(math.cos(d / (ratio * 10000 ** (2 * k / dim))) for k in range(dim // 2)) - dim / 2


def test_sandwich_is_float64_exact_after_double_and_shifts_the_left_keys_half_a_step():
    enc = build("sandwich", n_heads=3, dim=16).double()
    pos = torch.arange(300)
    causal = enc.bias(pos[-1:], pos, causal=True)[:, 0]
    encoder = enc.bias(pos[150:151], pos, causal=False)[:, 0]
    close = dict(rel=1e-13, abs=1e-12)  # float32 frequencies widened: ~2e-6 off here
    for h in range(3):
        assert causal[h, 0].item() == pytest.approx(sandwich_by_hand(h, 3, 16, 299), **close)
        assert encoder[h, 40].item() == pytest.approx(sandwich_by_hand(h, 3, 16, 109.5), **close)  # left
        assert encoder[h, 260].item() == pytest.approx(sandwich_by_hand(h, 3, 16, 110), **close)  # right
