"""The bias encodings' fast path through ``poslab.attend`` (``fast_bias`` and
``poslab.kernels.bias``) equals the eager float64 reference, outputs and gradients of q, k, v and
every parameter, in every shape the attention takes: full forwards, cached decoding, explicit
positions, blocks."""

from __future__ import annotations

import pytest
import torch

import poslab
from poslab.kernels import bias as bias_kernel
from test_attention import encoding64, run

BIASES = [
    "alibi",
    "kerple_log",
    "kerple_power",
    "t5",
    "fire",
    "fire[activation=leaky_relu]",
    "sandwich",
    "alibi+rope",
    "t5+kerple_log",
    "fire+sandwich",
]
# (T, S, positions): a full forward at odd lengths, cached decoding (the last T of S keys, as
# default or as explicit consecutive positions), one decoding step, and scattered positions.
SHAPES = [
    (11, 11, None),
    (5, 12, None),
    (5, 12, torch.arange(7, 12)),
    (1, 9, None),
    (4, 13, torch.tensor([2, 3, 7, 12])),
]


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the bias kernel's backward, so a test cannot pass by falling back."""
    calls = []
    original = bias_kernel.bias_attention_backward
    monkeypatch.setattr(bias_kernel, "bias_attention_backward", lambda *a: calls.append(a) or original(*a))
    return calls


def assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=["full", "decode", "decode-explicit", "one-step", "scattered"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", BIASES)
def test_bias_path_equals_the_eager_reference(name, causal, shape, spy):
    n_queries, n_keys, positions = shape
    enc = encoding64(name)
    q = torch.randn(2, 2, n_queries, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n_keys, 8, dtype=torch.float64) for _ in range(2))
    kwargs = dict(causal=causal, positions=positions)
    want = run(enc, q, k, v, impl="eager", **kwargs)
    assert_same(run(enc, q, k, v, **kwargs), want)
    assert len(spy) == 1
    with torch.no_grad():  # inference: SDPA's flash kernel with the same mask
        torch.testing.assert_close(poslab.attend(q, k, v, enc, **kwargs), want[0], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("block", [1, 3, 4, 16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", BIASES)
def test_bias_path_in_query_blocks_equals_the_eager_reference(name, causal, block, monkeypatch, spy):
    """Past SDPA_BIAS_ELEMENTS the bias is computed and attended block by block (odd block sizes
    and lengths; the last block is short)."""
    monkeypatch.setattr(poslab.attention, "SDPA_BIAS_ELEMENTS", 10)
    enc = encoding64(name)
    q, k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    assert_same(
        run(enc, q, k, v, causal=causal, block_size=block), run(enc, q, k, v, causal=causal, impl="eager")
    )
    assert len(spy) == -(-13 // block)


@pytest.mark.parametrize("name", ["dape[base=kerple_log]", "dape[base=fire]", "cope+t5"])
def test_logit_encodings_over_a_fast_bias_equal_the_eager_reference(name):
    """DAPE and CoPE take their bias from ``fast_bias`` too (a Toeplitz Kerple, FIRE's pieces)."""
    enc = encoding64(name)
    q, k, v = (torch.randn(2, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    assert_same(run(enc, q, k, v, block_size=4), run(enc, q, k, v, impl="eager"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", BIASES)
def test_fast_bias_equals_the_bias_hook(name, causal):
    """The values and the parameters' gradients of ``fast_bias`` are those of ``bias``, with and
    without the Toeplitz layout (``first`` given or not)."""
    enc = encoding64(name)
    probe = torch.randn(2, 7, 12, dtype=torch.float64)
    for first, q_pos in (
        (5, torch.arange(5, 12)),
        (0, torch.arange(7)),
        (None, torch.tensor([0, 3, 4, 5, 9, 10, 11])),
    ):
        k_pos = torch.arange(12)
        params = list(enc.parameters())
        want = enc.bias(q_pos, k_pos, causal=causal).expand(2, 7, 12)
        got = enc.fast_bias(q_pos, k_pos, causal=causal, first=first).expand(2, 7, 12)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        if params:
            grads = torch.autograd.grad((got * probe).sum(), params, allow_unused=True)
            ref = torch.autograd.grad((want * probe).sum(), params, allow_unused=True)
            for g, r in zip(grads, ref, strict=True):
                torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_fire_pieces_at_kinks_equal_the_mlp(activation):
    """Units whose kink -b1/w1 lies exactly on an input (b1 = 0: x = 0 on the diagonal and every
    future key), units with w1 = 0 (always on or always off), and two units sharing a kink: the
    piecewise form gives the MLP's values and gradients there too."""
    enc = poslab.build_encoding("fire", n_heads=2, head_dim=8, width=8, activation=activation).double()
    lin1 = enc.mlp[0]
    with torch.no_grad():
        lin1.bias[:2] = 0.0  # kinks at 0, rising and falling
        lin1.weight[0, 0], lin1.weight[1, 0] = 0.7, -0.4
        lin1.weight[2:4, 0] = 0.0  # flat units: one on (b1 > 0), one off
        lin1.bias[2], lin1.bias[3] = 0.3, -0.2
        lin1.weight[4, 0], lin1.bias[4] = 2.0, -1.0  # shares its kink 0.5 with unit 5
        lin1.weight[5, 0], lin1.bias[5] = -4.0, 2.0
    pos = torch.arange(9)
    for causal in (True, False):
        x = enc._inputs(pos, pos, causal)
        assert (x == 0).any()
        probe = torch.randn(2, 9, 9, dtype=torch.float64)
        params = list(enc.parameters())
        fast = enc.fast_bias(pos, pos, causal=causal, first=0)
        ref = enc.bias(pos, pos, causal=causal)
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
        for g, r in zip(
            torch.autograd.grad((fast * probe).sum(), params),
            torch.autograd.grad((ref * probe).sum(), params),
            strict=True,
        ):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)
    # x exactly on the shared kink 0.5: both units are off there, as in the MLP
    x = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, requires_grad=True)
    from poslab.encodings.fire import piecewise_linear

    fast = piecewise_linear(enc.mlp, x)
    ref = enc.mlp(x[:, None]).t()
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
    g_fast = torch.autograd.grad(fast.sum(), [x, *enc.mlp.parameters()])
    g_ref = torch.autograd.grad(ref.sum(), [x, *enc.mlp.parameters()])
    for g, r in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["alibi", "kerple_power", "t5", "fire", "sandwich"])
def test_bias_path_stays_within_the_error_budget(name):
    """In float32 the fast path may be at most ~2x as wrong as the eager path (flash-attention's
    rule), both against the float64 reference; gradients too. Long enough (T 96, steep biases) that
    most keys' probabilities underflow."""
    enc64 = encoding64(name, n_heads=4, head_dim=16)
    enc32 = poslab.build_encoding(name, n_heads=4, head_dim=16)
    enc32.load_state_dict(enc64.state_dict())
    enc32 = enc32.float()
    q, k, v = (torch.randn(2, 4, 96, 16, dtype=torch.float64) * 3 for _ in range(3))
    ref_out, ref_grads = run(enc64, q, k, v, impl="eager")
    eager_out, eager_grads = run(enc32, q.float(), k.float(), v.float(), impl="eager")
    fast_out, fast_grads = run(enc32, q.float(), k.float(), v.float())

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(fast_out, ref_out) <= 2 * err(eager_out, ref_out) + 1e-6
    for fast, eager, ref in zip(fast_grads, eager_grads, ref_grads, strict=True):
        if ref is not None:
            assert err(fast, ref) <= 2 * err(eager, ref) + 1e-5
