"""Per-layer encoding schedules: ``ModelConfig(encoding=[spec, ...])``, one spec per layer, cycled."""

from __future__ import annotations

import io
import json

import pytest
import torch

import poslab
from conftest import perturb_parameters, tiny_config
from poslab.encodings.rope import RoPE


def test_rope_in_layers_0_to_2_and_nope_in_layer_3(monkeypatch):
    config = tiny_config(["rope", "rope", "rope", "nope"], n_layers=4)
    model = poslab.build_model(config)
    assert config.schedule == ("rope", "rope", "rope", "nope")
    assert [model.encoding(layer).name for layer in range(4)] == ["rope", "rope", "rope", "nope"]
    assert model.encoding(0) is model.encoding(2)  # RoPE is shared across its layers
    assert len(model.encodings) == 2
    # The attention really rotates in three layers, and only there.
    calls = []
    original = RoPE.rotate
    monkeypatch.setattr(RoPE, "rotate", lambda self, *a: calls.append(1) or original(self, *a))
    model(torch.randint(0, 13, (2, 9)))
    assert len(calls) == 3
    # ... and layer 3 is NoPE: its attention output is that of a plain attention with no encoding
    x = torch.randn(1, 9, 32)
    attn = model.blocks[3].attn
    got = attn(x, model.encoding(3), torch.arange(9))
    q, k, v = attn.qkv(x).view(1, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    want = attn.out(poslab.attend(q, k, v, None).transpose(1, 2).reshape(1, 9, 32))
    torch.testing.assert_close(got, want)


def test_a_short_schedule_is_cycled_and_a_string_with_commas_is_one():
    config = tiny_config("rope[scaling=yarn,factor=4,original_max_len=16],nope", n_layers=5)
    assert config.encoding == ("rope[scaling=yarn,factor=4,original_max_len=16]", "nope")
    assert config.schedule[::2] == ("rope[scaling=yarn,factor=4,original_max_len=16]",) * 3
    assert config.schedule[1::2] == ("nope", "nope")
    assert tiny_config(["alibi"]).encoding == "alibi"  # one spec: the plain form


@pytest.mark.parametrize(
    "schedule",
    [["rope", "rope", "rope", "nope"], ["kerple_log", "cope+rope", "dape[base=alibi]", "nope"]],
)
def test_cached_decoding_equals_recomputing(schedule):
    model = poslab.build_model(tiny_config(schedule, n_layers=4)).eval()
    perturb_parameters(model)
    prompt = torch.randint(0, 13, (2, 5))
    full = model.generate(prompt, 10, use_cache=False)
    assert torch.equal(model.generate(prompt, 10, use_cache=True), full)
    cache = model.new_cache()
    with torch.no_grad():
        steps = torch.cat([model(full[:, t : t + 1], cache=cache) for t in range(full.shape[1])], dim=1)
        torch.testing.assert_close(steps, model(full), atol=2e-5, rtol=1e-4)


def test_per_layer_modules_and_checkpoint_and_config_json_round_trip():
    config = tiny_config(["kerple_log", "rope", "kerple_log", "nope"], n_layers=4)
    model = poslab.build_model(config)
    perturb_parameters(model)
    # kerple is per layer (two modules for layers 0 and 2), rope and nope one each, in order of use
    assert model.layer_encoding == [0, 1, 2, 3]
    assert model.encoding(0) is not model.encoding(2)
    restored_config = poslab.ModelConfig(**json.loads(json.dumps(config.to_dict())))
    assert restored_config == config
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = poslab.build_model(restored_config)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randint(0, 13, (2, 12))
    torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)
    shared = poslab.build_model(tiny_config(["kerple_log", "nope"], n_layers=4, share_encoding=True))
    assert shared.layer_encoding == [0, 1, 0, 1]


def test_a_single_spec_keeps_its_module_layout():
    """Old checkpoints still load: one module for a shared method, one per layer otherwise."""
    assert len(poslab.build_model(tiny_config("rope", n_layers=3)).encodings) == 1
    assert poslab.build_model(tiny_config("alibi", n_layers=3)).layer_encoding == [0, 0, 0]
    model = poslab.build_model(tiny_config("kerple_log", n_layers=3))
    assert model.layer_encoding == [0, 1, 2] and len(model.encodings) == 3


def test_encoding_options_go_to_the_specs_that_take_them():
    config = tiny_config(["rope", "nope"], encoding_options={"base": 500.0})
    assert config.build_encoding(0).base == 500.0
    with pytest.raises(
        ValueError, match="model.encoding_options npos_max taken by no encoding of the schedule"
    ):
        tiny_config(["rope", "nope"], encoding_options={"npos_max": 8})


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        (["rope", "bogus"], r"model.encoding\[1\] 'bogus': unknown encoding 'bogus'"),
        (["rope", "rope[factor=0.5]"], r"model.encoding\[1\] 'rope\[factor=0.5\]': rope factor must be >= 1"),
        (["rope", "learned"], r"model.encoding\[1\] 'learned' acts on the token embeddings"),
        (["sinusoidal+rope", "nope"], r"model.encoding\[0\] 'sinusoidal\+rope' acts on the token"),
        (["rope", "nope", "rope"], "model.encoding lists 3 specs, one per layer, for 2 layers"),
        ("rope,,nope", "non-empty list of non-empty specs"),
        ([], "non-empty list of non-empty specs"),
        (["rope", 3], "non-empty list of non-empty specs"),
        (3, "model.encoding must be a spec or a list of specs"),
    ],
)
def test_bad_schedules_are_refused_with_a_message(encoding, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(encoding)
