"""Contract tests over every registered encoding, the compositions and key variants.

A new encoding gets these for free: causality, finite gradients for every parameter, lengths 8x
beyond anything seen, fused path == eager path, in decoder and encoder mode.
"""

from __future__ import annotations

import pytest
import torch

import poslab
from conftest import ALL_ENCODINGS, decoder_only, extra_keys_for, perturb_parameters, tiny_config
from poslab.encodings.dape import DAPE

TRAIN_LEN = 16


def future_leak(model: torch.nn.Module, length: int = 24, cut: int = 10) -> float:
    """Largest change of outputs at positions < cut when tokens at positions >= cut change."""
    x = torch.randint(0, 13, (2, length))
    y = x.clone()
    y[:, cut:] = torch.randint(0, 13, (2, length - cut))
    with torch.no_grad():
        return (model(x)[:, :cut] - model(y)[:, :cut]).abs().max().item()


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_causal_model_does_not_see_the_future(name):
    model = poslab.build_model(tiny_config(name))
    perturb_parameters(model)
    assert future_leak(model) < 1e-5


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_encoder_sees_the_future(name):
    """The bidirectional mode must really be bidirectional (guards against a stray causal mask)."""
    if decoder_only(name, causal=False):
        pytest.skip(f"{name} is defined for decoders only (encoder mode refused)")
    model = poslab.build_model(tiny_config(name, causal=False))
    perturb_parameters(model)
    assert future_leak(model) > 1e-4


def test_dape_v2_without_causal_zeroing_leaks(monkeypatch):
    """The causality test bites: V2's convolution without zeroing the future leaks it into the past."""
    model = poslab.build_model(tiny_config("dape[kernel_size=3]"))
    perturb_parameters(model)
    assert future_leak(model) < 1e-5  # the native kernel where it is built
    monkeypatch.setenv("POSLAB_NATIVE", "0")  # the eager path, whose mix is patched below
    assert future_leak(model) < 1e-5
    original = DAPE.mix
    monkeypatch.setattr(DAPE, "mix", lambda self, features, keep: original(self, features, None))
    assert future_leak(model) > 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_every_parameter_gets_a_finite_gradient(name, causal):
    if decoder_only(name, causal):
        pytest.skip(f"{name} is defined for decoders only (encoder mode refused)")
    model = poslab.build_model(tiny_config(name, causal=causal))
    perturb_parameters(model)
    x = torch.randint(0, 13, (3, TRAIN_LEN))
    model(x).logsumexp(-1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_runs_8x_past_the_longest_length_seen(name, causal):
    if decoder_only(name, causal):
        pytest.skip(f"{name} is defined for decoders only (encoder mode refused)")
    config = tiny_config(name, causal=causal, max_len=TRAIN_LEN)
    model = poslab.build_model(config)
    model(torch.randint(0, 13, (2, TRAIN_LEN)))
    long = torch.randint(0, 13, (1, 8 * TRAIN_LEN))
    if "learned" in name:
        with pytest.raises(ValueError, match="learned absolute positions cover 0..15"):
            model(long)
        return
    with torch.no_grad():
        out = model(long)
    assert out.shape == (1, 8 * TRAIN_LEN, 13)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_fused_path_equals_eager_path(name, causal):
    if decoder_only(name, causal):
        pytest.skip(f"{name} is defined for decoders only (encoder mode refused)")
    fused = poslab.build_model(tiny_config(name, causal=causal, attn_impl="auto"))
    perturb_parameters(fused)
    eager = poslab.build_model(tiny_config(name, causal=causal, attn_impl="eager"))
    eager.load_state_dict(fused.state_dict())
    x = torch.randint(0, 13, (2, 20))
    out_f, out_e = fused(x), eager(x)
    torch.testing.assert_close(out_f, out_e, atol=2e-5, rtol=1e-4)
    out_f.square().mean().backward()
    out_e.square().mean().backward()
    for (pname, pf), pe in zip(fused.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pe.grad, atol=2e-5, rtol=1e-3, msg=pname)


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_encoder_tells_the_key_on_the_left_from_the_key_on_the_right(name):
    """With the same content at every position, the attention weight of the key at i - 1 and of the
    key at i + 1 must differ: an encoding of |i - j| alone cannot tell them apart. The values are
    one-hot key indices, so the output rows are the attention weights."""
    enc = poslab.build_encoding(name, n_heads=2, head_dim=12)
    if not enc.supports_bidirectional or not enc.hooks - {"embed"}:
        pytest.skip(f"{name} does not act in bidirectional attention")
    if name == "dape[base=none]":
        pytest.skip("DAPE over NoPE has no position information in an encoder")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    enc = enc.double()
    S = 12
    # q differs from k: RoPE's q.R(n)k is symmetric in n when q == k.
    q, k = (torch.randn(1, 2, 1, 12, dtype=torch.float64).expand(1, 2, S, 12) for _ in range(2))
    v = torch.eye(S, dtype=torch.float64).expand(1, 2, S, S)
    x = torch.randn(1, 1, 24, dtype=torch.float64).expand(1, S, 24)  # same layer input everywhere
    extra = extra_keys_for(enc, x, q)
    weights = poslab.attend(q, k, v, enc, causal=False, impl="eager", extra_keys=extra)[0]  # (H, S, S)
    for i in (1, 5, 10):
        left, right = weights[:, i, i - 1], weights[:, i, i + 1]
        assert ((left - right).abs() > 1e-9).all(), f"query {i}: left {left} vs right {right}"


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_attend_with_offset_queries_equals_the_last_rows(name):
    """Queries given as the last T of S keys (what a cache does) reproduce the full forward's rows."""
    enc = poslab.build_encoding(name, n_heads=2, head_dim=8)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    enc = enc.double()
    # Encodings that read the layer input (CoPE's sep_key, FoX) or earlier queries get them too.
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    extra = extra_keys_for(enc, x, q)
    full = poslab.attend(q, k, v, enc, extra_keys=extra)
    last = poslab.attend(q[:, :, -3:], k, v, enc, extra_keys=extra)
    torch.testing.assert_close(last, full[:, :, -3:])


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_cached_generation_equals_recomputing(name):
    model = poslab.build_model(tiny_config(name)).eval()
    perturb_parameters(model)
    prompt = torch.randint(0, 13, (2, 5))
    cached = model.generate(prompt, 12, use_cache=True)
    full = model.generate(prompt, 12, use_cache=False)
    assert torch.equal(cached, full)
    # Logits too, not just argmaxes: feed one token at a time and compare with the full forward.
    cache = model.new_cache()
    steps = torch.cat([model(full[:, t : t + 1], cache=cache) for t in range(full.shape[1])], dim=1)
    torch.testing.assert_close(steps, model(full), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_training_works_after_generation(name):
    """generate runs under inference_mode: its output and anything it built (caches, tables) must
    not leak inference tensors into a later backward."""
    model = poslab.build_model(tiny_config(name))
    tokens = model.generate(torch.randint(0, 13, (2, 4)), 6)
    model(tokens).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_cached_forward_gradients_equal_the_full_forward(name):
    """Feeding a sequence through the cache in chunks gives the full forward's parameter gradients."""
    model = poslab.build_model(tiny_config(name)).double()
    perturb_parameters(model)
    x = torch.randint(0, 13, (2, 11))
    model(x).square().mean().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cache = model.new_cache()
    chunks = torch.cat([model(x[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 11))], dim=1)
    chunks.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-10, rtol=1e-8, msg=n)
