"""RoPE's Hugging Face scalings (dynamic NTK, llama3, longrope), partial rotation and p-RoPE, pinned to
transformers' ``ROPE_INIT_FUNCTIONS`` and its rotary embedding; cached decoding across LongRoPE's and
dynamic NTK's switch at ``original_max_len``."""

from __future__ import annotations

import math

import pytest
import torch

import poslab

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

# HF computes in float32 (its pow of a float32 exponent by ln(base) ~ 13 loses up to ~1e-6).
RTOL = 4e-6


def longrope_factors(n_pairs):
    """Short and long factors growing towards the low frequencies, as Phi-3's do."""
    ramp = [i / max(n_pairs - 1, 1) for i in range(n_pairs)]
    return {"short_factor": [1.0 + r for r in ramp], "long_factor": [1.0 + 15.0 * r * r for r in ramp]}


def hf_config(head_dim, rope_parameters, max_position_embeddings=4096):
    return LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
    )


def case(scaling, head_dim, partial, base=10000.0):
    """(poslab options, HF rope type, HF config) for one scaling at ``original_max_len`` L = 64."""
    length, n_pairs = 64, int(head_dim * partial) // 2
    hf = {"rope_theta": base, "partial_rotary_factor": partial}
    mine = {"base": base, "partial": partial, "original_max_len": length}
    max_pos = 4096
    if scaling == "linear":
        hf |= {"rope_type": "linear", "factor": 4.0}
        mine |= {"scaling": "linear", "factor": 4.0}
    elif scaling == "dynamic":
        hf |= {"rope_type": "dynamic", "factor": 4.0}
        mine |= {"scaling": "dynamic", "factor": 4.0}
        max_pos = length  # HF's dynamic NTK reads max_position_embeddings as the original length
    elif scaling == "llama3":
        factors = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        hf |= {"rope_type": "llama3", "original_max_position_embeddings": length, **factors}
        mine |= {"scaling": "llama3", **factors}
    elif scaling == "yarn":
        hf |= {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": length}
        mine |= {"scaling": "yarn", "factor": 4.0}
    elif scaling == "longrope":
        lists = longrope_factors(n_pairs)
        hf |= {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": length, **lists}
        mine |= {"scaling": "longrope", "factor": 4.0, **lists}
    rope = poslab.build_encoding("rope", n_heads=2, head_dim=head_dim, **mine)
    return rope, hf["rope_type"], hf_config(head_dim, hf, max_pos)


@pytest.mark.parametrize("partial", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("scaling", ["linear", "dynamic", "llama3", "yarn", "longrope"])
def test_scalings_equal_hugging_face(scaling, head_dim, partial):
    """inv_freq and the attention factor at lengths below, at and beyond L = 64 (HF's seq_len)."""
    base = 500000.0 if head_dim == 128 else 10000.0
    rope, rope_type, config = case(scaling, head_dim, partial, base)
    for seq_len in (None, 32, 64, 65, 200, 1000):
        want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
        got, factor = rope.frequencies(seq_len)
        assert got.dtype == torch.float64 and got.shape == (int(head_dim * partial) // 2,)
        torch.testing.assert_close(got, want.double(), atol=0, rtol=RTOL, msg=f"seq_len {seq_len}")
        assert factor == pytest.approx(want_factor, rel=1e-12)
    # the unscaled regime is what the module holds (HF's init, seq_len None)
    want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    torch.testing.assert_close(rope.inv_freq.double(), want.double(), atol=0, rtol=RTOL)
    assert rope.mscale == pytest.approx(want_factor, rel=1e-12)


def test_longrope_default_and_given_attention_factor():
    rope, _, _ = case("longrope", 16, 1.0)
    assert rope.mscale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    given = poslab.build_encoding(
        "rope", n_heads=1, head_dim=4, scaling="longrope", short_factor=1, long_factor=(2, 3),
        attention_factor=1.5,
    )  # fmt: skip
    assert given.mscale == 1.5 and given.short_factor == (1.0, 1.0)
    spec = poslab.build_encoding(
        "rope[scaling=longrope,short_factor=(1,1.5),long_factor=(2,4)]", n_heads=1, head_dim=4
    )
    assert spec.long_factor == (2.0, 4.0)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_p_rope_equals_hugging_face_proportional(p, factor):
    """p-RoPE keeps the int(p Dh / 2) highest frequencies: HF's 'proportional' rope type, whose
    partial_rotary_factor is p (and whose factor divides the frequencies as linear scaling)."""
    config = hf_config(32, {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": p,
                            "factor": factor})  # fmt: skip
    want, want_factor = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    scaling = "linear" if factor > 1 else "none"
    rope = poslab.build_encoding("rope", n_heads=1, head_dim=32, p=p, scaling=scaling, factor=factor)
    torch.testing.assert_close(rope.frequencies()[0], want.double(), atol=0, rtol=RTOL)
    assert rope.mscale == want_factor == 1.0
    assert int((rope.inv_freq > 0).sum()) == int(p * 32 // 2)


def test_p_rope_leaves_the_lowest_frequency_channels_unrotated_and_p0_is_nope():
    rope = poslab.build_encoding("rope[p=0.25]", n_heads=1, head_dim=16).double()
    x = torch.randn(1, 1, 5, 16, dtype=torch.float64)
    pos = torch.arange(100, 105)
    y = rope.apply(x, pos)
    kept = [k for k in range(8) if k >= 2]  # pairs (k, k + 8) for the 6 zero frequencies
    cols = kept + [k + 8 for k in kept]
    torch.testing.assert_close(y[..., cols], x[..., cols], atol=0, rtol=0)
    assert not torch.allclose(y[..., [0, 1, 8, 9]], x[..., [0, 1, 8, 9]])
    nope = poslab.build_encoding("rope[p=0]", n_heads=1, head_dim=16).double()
    torch.testing.assert_close(nope.apply(x, pos), x, atol=0, rtol=0)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("partial", [0.25, 0.5, 0.75])
def test_partial_rotation_rotates_the_first_channels_as_hugging_face(partial):
    """HF's partial models (GPT-NeoX, Phi, ...) rotate x[..., :R] with rotate_half and pass the rest:
    poslab with the cos and sin of HF's rotary embedding (float64 angles)."""
    rope = poslab.build_encoding("rope", n_heads=2, head_dim=16, partial=partial).double()
    dim = int(16 * partial)
    assert rope.rotary_dim == dim
    parameters = {
        "rope_type": "linear",
        "factor": 1.0,
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial,
    }
    config = hf_config(16, parameters)  # linear at factor 1: the default frequencies over R channels
    hf_rope = LlamaRotaryEmbedding(config).double()
    q, k = torch.randn(2, 2, 7, 16, dtype=torch.float64), torch.randn(2, 2, 7, 16, dtype=torch.float64)
    pos = torch.arange(7) + 30
    cos, sin = hf_rope(q, pos[None])
    cos, sin = cos[0].double(), sin[0].double()  # (T, R)

    def hf_apply(x):
        rot, rest = x[..., :dim], x[..., dim:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    got_q, got_k = rope.rotate(q, k, pos, pos)
    torch.testing.assert_close(got_q, hf_apply(q), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, hf_apply(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_q[..., dim:], q[..., dim:], atol=0, rtol=0)


@pytest.mark.parametrize("scaling", ["dynamic", "longrope"])
def test_per_call_frequencies_follow_hugging_faces_rotary_embedding(scaling):
    """HF's rotary embedding picks its frequencies per forward call from max(position_ids) + 1: a
    prompt, then decoding steps that cross L = 64. poslab's angles for the same calls are the same."""
    rope, _, config = case(scaling, 16, 1.0)
    hf_rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, 16)
    calls = [torch.arange(60), *(torch.tensor([t]) for t in range(60, 70)), torch.arange(100)]
    for pos in calls:
        cos, sin = hf_rope(x, pos[None])
        got_cos, got_sin = rope.angles(pos)
        torch.testing.assert_close(got_cos, cos[0], atol=2e-5, rtol=0, msg=f"up to {int(pos.max())}")
        torch.testing.assert_close(got_sin, sin[0], atol=2e-5, rtol=0)


def test_dynamic_is_stateless_where_hugging_face_keeps_the_longest_length():
    """The one documented deviation: after a call of length 200, HF keeps that call's base for a
    later call of length 100 (longer than L = 64); poslab recomputes it from the call itself, as a
    fresh HF module does."""
    rope, _, config = case("dynamic", 16, 1.0)
    used, fresh = LlamaRotaryEmbedding(config), LlamaRotaryEmbedding(config)
    x, pos = torch.zeros(1, 1, 16), torch.arange(100)
    used(x, torch.arange(200)[None])
    stale, want = used(x, pos[None])[1][0], fresh(x, pos[None])[1][0]
    assert not torch.allclose(stale, want, atol=1e-3)
    torch.testing.assert_close(rope.angles(pos)[1], want, atol=2e-5, rtol=0)


def tiny_model(spec):
    config = poslab.ModelConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=2, encoding=spec)
    model = poslab.build_model(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def cached_and_recomputed(model, tokens, prompt):
    """Logits of each new token: through the cache (a prompt, then one token per step) and by
    recomputing the whole prefix at every step (``generate(use_cache=False)``)."""
    with torch.no_grad():
        cache = model.new_cache()
        cached = [model(tokens[:, :prompt], cache=cache)[:, -1]]
        cached += [model(tokens[:, t : t + 1], cache=cache)[:, -1] for t in range(prompt, tokens.shape[1])]
        full = [model(tokens[:, : t + 1])[:, -1] for t in range(prompt - 1, tokens.shape[1])]
    return torch.stack(cached, 1), torch.stack(full, 1)  # (B, steps, V); step i ends at prompt - 1 + i


LONGROPE_SPEC = "rope[scaling=longrope,factor=4,original_max_len=8,short_factor=(1,1.2,1.5,2,3,4,6,8),long_factor=(1,2,4,8,12,16,24,32)]"  # noqa: E501


@pytest.mark.parametrize("spec", [LONGROPE_SPEC, "rope[scaling=dynamic,factor=4,original_max_len=8]"])
def test_cached_decoding_across_the_switch(spec):
    """Cached keys keep the rotation of the call that made them (as in HF): cached decoding equals
    recomputation up to L = 8, and after a prompt longer than L for longrope (all keys long); a
    decoding that crosses L differs from recomputation from the first step past L on, as in HF."""
    model = tiny_model(spec)
    tokens = torch.randint(0, 13, (2, 16))
    cached, full = cached_and_recomputed(model, tokens, prompt=3)
    ends = torch.arange(2, 16) + 1  # sequence length at each step
    inside = ends <= 8
    torch.testing.assert_close(cached[:, inside], full[:, inside], atol=1e-10, rtol=0)
    past = (cached[:, ~inside] - full[:, ~inside]).abs().amax(dim=(0, 2))
    assert (past > 1e-6).all(), past  # crossing: the keys before L stay rotated as they were
    cached, full = cached_and_recomputed(model, tokens, prompt=10)  # the prompt is past L
    if "longrope" in spec:
        torch.testing.assert_close(cached, full, atol=1e-10, rtol=0)
    else:  # dynamic NTK changes the base at every length past L: no step equals recomputation
        assert ((cached[:, 1:] - full[:, 1:]).abs().amax(dim=(0, 2)) > 1e-6).all()
        torch.testing.assert_close(cached[:, 0], full[:, 0], atol=1e-10, rtol=0)


def test_rope_option_errors():
    build = lambda **o: poslab.build_encoding("rope", n_heads=1, head_dim=16, **o)  # noqa: E731
    assert build(partial=0.3).rotary_dim == 4  # int(4.8), as HF
    with pytest.raises(ValueError, match=r"rope partial=0.2 rotates int\(16 \* 0.2\) = 3 channels"):
        build(partial=0.2)
    with pytest.raises(ValueError, match=r"partial must be in \(0, 1\]"):
        build(partial=0)
    with pytest.raises(ValueError, match=r"rope p must be in \[0, 1\]"):
        build(p=1.5)
    with pytest.raises(ValueError, match="longrope needs short_factor and long_factor"):
        build(scaling="longrope")
    with pytest.raises(ValueError, match=r"needs one factor per rotated channel pair \(8\), got 2"):
        build(scaling="longrope", short_factor=(1, 2), long_factor=1)
    with pytest.raises(ValueError, match="apply to scaling=longrope, not 'yarn'"):
        build(scaling="yarn", long_factor=1)
    with pytest.raises(ValueError, match="attention_factor applies to yarn and longrope"):
        build(scaling="llama3", attention_factor=1.2)
    with pytest.raises(ValueError, match="llama3 needs 0 < low_freq_factor < high_freq_factor"):
        build(scaling="llama3", low_freq_factor=4.0, high_freq_factor=1.0)
