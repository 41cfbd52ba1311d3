"""poslab.hf: poslab encodings inside transformers' Llama-family decoders (tiny random models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import poslab  # noqa: E402
from poslab import hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()

EMBED_ENCODINGS = ["learned", "sinusoidal"]
ENCODINGS = [e for e in poslab.list_encodings() if e not in EMBED_ENCODINGS] + [
    "cope+rope",
    "cope+alibi",
    "cope+t5",
    "dape[base=kerple_log]",
    "dape[base=fire,kernel_size=3]",
    "cope[sep_key=true]",
]
VOCAB = 64


def tiny(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, 4-head (2 key heads), hidden-32 decoder with weights large enough that attention is
    far from uniform (so a position error shows in the logits)."""
    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        pad_token_id=0,
    )
    options.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **options)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def applied(spec: str, model_type: str = "llama", **overrides) -> torch.nn.Module:
    """A tiny model with ``spec``; encoding parameters moved off their (often zero) init."""
    model = hf.apply(tiny(model_type, **overrides), spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_encoding" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ENCODINGS)
def test_forward_is_causal_and_cached_generation_equals_uncached(spec):
    model = applied(spec).double()  # float64: rounding far below the tolerances
    x = tokens(2, 12)
    changed = x.clone()
    changed[:, 7:] = tokens(2, 5, seed=2)
    with torch.no_grad():
        a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3

    runs = [
        model.generate(
            x[:, :5],
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, full in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_rope_leaves_the_models_logits_unchanged(model_type):
    x, mask = tokens(3, 10), torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding too
    reference = tiny(model_type)
    with torch.no_grad():
        expected = reference(x, attention_mask=mask).logits
        got = hf.apply(tiny(model_type), "rope")(x, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1  # logits large enough for the comparison to mean something


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_qwen2_and_mistral_take_encodings_too(model_type):
    model = applied("dape[base=kerple_log]", model_type).double()
    assert isinstance(model.model.rotary_emb, hf.NoRotary)
    x, left = tokens(2, 8), torch.ones(2, 8, dtype=torch.long)
    left[1, :3] = 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True)
    runs = [
        model.generate(x, attention_mask=left, use_cache=c, return_dict_in_generate=True, **settings)
        for c in (True, False)
    ]
    for cached, full in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)
    alone = model.generate(x[1:, 3:], return_dict_in_generate=True, **settings)
    torch.testing.assert_close(runs[0].logits[-1][1], alone.logits[-1][0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", ["nope", "alibi", "cope"])
def test_other_encodings_do_change_the_logits(spec):
    x = tokens(2, 10)
    with torch.no_grad():
        assert (applied(spec)(x).logits - tiny()(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("spec", ENCODINGS)
def test_padded_rows_equal_the_rows_alone(spec):
    """Left padding (generation) and right padding (training): each row as if it were alone."""
    model = applied(spec).double()
    rows = [tokens(n, seed=n) for n in (9, 6, 3)]
    left, right = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, 9 - len(r) :], right[i, : len(r)] = r, r
    mask = (left != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate makes them; RoPE needs them
    with torch.no_grad():
        out_left = model(left, attention_mask=mask, position_ids=positions).logits
        out_right = model(right, attention_mask=(right != 0).long()).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(out_left[i, 9 - len(r) :], alone, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(out_right[i, : len(r)], alone, rtol=1e-9, atol=1e-9)


def test_left_padding_without_row_positions_is_refused_when_rope_is_composed():
    """CoPE's position logits read the rotated queries, so the padding offset would leak in."""
    x, mask = tokens(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        applied("rope")(x, attention_mask=mask)  # RoPE alone sees differences only: fine
        with pytest.raises(ValueError, match="pass position_ids that count each row"):
            applied("cope+rope")(x, attention_mask=mask)


@pytest.mark.parametrize("spec", ["dape", "cope+rope", "fire", "fox", "selective"])
def test_left_padded_generation_equals_each_row_alone(spec):
    model = applied(spec).double()
    rows = [tokens(n, seed=n) for n in (7, 4)]
    batch = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, 7 - len(r) :] = r
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True)
    together = model.generate(
        batch, attention_mask=(batch != 0).long(), return_dict_in_generate=True, **settings
    )
    for i, r in enumerate(rows):
        alone = model.generate(r[None], return_dict_in_generate=True, **settings)
        assert torch.equal(together.sequences[i, 7:], alone.sequences[0, len(r) :])
        for a, b in zip(together.logits, alone.logits, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", ENCODINGS)
def test_a_few_training_steps_lower_the_loss(spec):
    model = applied(spec).train()
    x = tokens(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    own = [p for n, p in model.named_parameters() if "position_encoding" in n]
    assert all(p.grad is not None for p in own)
    assert not own or sum(p.grad.abs().sum() for p in own) > 0


def test_each_layer_owns_its_encoding_in_parameters_and_state_dict():
    model = applied("dape")
    layers = model.model.layers
    assert layers[0].self_attn.position_encoding is not layers[1].self_attn.position_encoding
    names = [n for n, _ in model.named_parameters() if "position_encoding" in n]
    assert {n.split(".")[2] for n in names} == {"0", "1"}
    assert set(names) <= set(model.state_dict())
    assert model.config.poslab_encoding == {"spec": "dape", "options": {}, "impl": "auto"}


@pytest.mark.parametrize("spec", ["dape[base=kerple_log]", "cope+rope", "t5"])
def test_save_and_load_round_trip_exactly(spec, tmp_path):
    model = applied(spec)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["poslab_encoding"]["spec"] == spec
    x = tokens(2, 11)
    with torch.no_grad():
        expected = model(x).logits
        # by hand: the model from its config, the same spec, the weights
        config = transformers.AutoConfig.from_pretrained(tmp_path)
        rebuilt = hf.apply(transformers.AutoModelForCausalLM.from_config(config), spec)
        hf.load_weights(rebuilt, tmp_path)
        assert torch.equal(rebuilt.eval()(x).logits, expected)
        # the spec read back from the config
        assert torch.equal(hf.from_pretrained(tmp_path)(x).logits, expected)


def test_loading_without_a_recorded_spec_or_with_another_spec_fails(tmp_path):
    tiny().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no poslab_encoding"):
        hf.from_pretrained(tmp_path / "plain")
    applied("cope").save_pretrained(tmp_path / "cope")
    with pytest.raises(ValueError, match="do not match the model: missing"):
        hf.load_weights(hf.apply(tiny(), "dape"), tmp_path / "cope")


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens(2, 12)
    grads = []
    for checkpointing in (False, True):
        model = applied("cope+rope").train()
        if checkpointing:  # renamed activation checkpointing in transformers 5
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["dape", "cope+rope", "alibi"])
def test_half_precision_runs_close_to_float32(spec, dtype):
    model = applied(spec)
    x = tokens(2, 12)
    with torch.no_grad():
        expected = model(x).logits
    model.to(dtype)
    logits = model(x).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    logits.float().logsumexp(-1).sum().backward()
    own = [p for n, p in model.named_parameters() if "position_encoding" in n]
    assert all(torch.isfinite(p.grad).all() for p in own)


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (
            lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4)),
            "dape",
            "supports Llama-family decoders",
        ),
        (tiny, "learned", "acts on token embeddings"),
        (tiny, "sinusoidal+alibi", "acts on token embeddings"),
        (tiny, "rope[base=500000]", "set base in the model config"),
        (tiny, "cope+rope", None),
        (lambda: tiny(attention_dropout=0.1), "alibi", "attention_dropout=0.1 is not supported"),
        (tiny, "nosuch", "unknown encoding"),
        (tiny, "dape[width=0]", "width"),
    ],
)
def test_unsupported_models_and_options_get_a_one_line_error(make, spec, message):
    model = make()
    if message is None:
        hf.apply(model, spec)
        with pytest.raises(ValueError, match="already carries a poslab encoding"):
            hf.apply(model, "alibi")
        return
    with pytest.raises(ValueError, match=message) as error:
        hf.apply(model, spec)
    assert "\n" not in str(error.value)


def test_bad_impl_and_unsaveable_options_are_refused():
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        hf.apply(tiny(), "alibi", impl="flash")
    with pytest.raises(ValueError, match="rewrites logits; impl='fused' cannot run it"):
        hf.apply(tiny(), "cope+rope", impl="fused")
    model = tiny()
    with pytest.raises(ValueError, match="acts on token embeddings"):
        hf.apply(model, "alibi+learned")
    assert not isinstance(model.model.rotary_emb, hf.NoRotary)  # a refused spec leaves the model as it was
    assert model.config._attn_implementation != "poslab"
    x = tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            hf.apply(tiny(), "alibi", impl="eager")(x).logits, applied("alibi")(x).logits
        )
    with pytest.raises(ValueError, match="JSON values"):
        hf.apply(tiny(), "rope", rope={"base": object()})


def test_a_mask_poslab_cannot_honour_is_refused():
    """A sliding window shorter than the input makes a non-causal mask: refused, not ignored."""
    model = applied("alibi", "mistral", sliding_window=4)
    with torch.no_grad():
        model(tokens(1, 4))  # within the window: plain causal
        with pytest.raises(ValueError, match="not causal with left or right padding"):
            model(tokens(1, 8))
    middle = torch.ones(1, 8, dtype=torch.long)
    middle[0, 3] = 0
    with pytest.raises(ValueError, match="padding inside a row"):
        applied("alibi")(tokens(1, 8), attention_mask=middle)


@pytest.mark.parametrize("spec", ["alibi", "rope"])
def test_a_static_cache_is_refused(spec):
    """Its keys include empty future slots and its prefill mask is None (SDPA's top-left causal)."""
    with pytest.raises(ValueError, match="static cache"):
        applied(spec).generate(tokens(1, 5), max_new_tokens=3, cache_implementation="static", pad_token_id=0)


def test_poslab_imports_without_transformers_and_hf_says_what_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import poslab\n"
        "try:\n    import poslab.hf\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'poslab[hf]'" in out


@pytest.mark.parametrize(
    ("spec", "rotated"), [("nope", False), ("cope", False), ("rope", True), ("cope+rope", True)]
)
def test_the_models_rotary_embedding_is_off_unless_the_spec_names_rope(spec, rotated):
    assert isinstance(applied(spec).model.rotary_emb, hf.NoRotary) != rotated


def test_nope_reads_the_earlier_tokens_as_a_set():
    """With the rotary embedding really off, reversing the tokens before the last changes nothing
    at the last position of a one-layer NoPE model (it would under RoPE)."""
    x = tokens(1, 10)
    reversed_ = torch.cat([x[:, :9].flip(1), x[:, 9:]], dim=1)
    for spec, invariant in (("nope", True), ("rope", False)):
        model = applied(spec, num_hidden_layers=1).double()
        with torch.no_grad():
            change = (model(x).logits[0, -1] - model(reversed_).logits[0, -1]).abs().max()
        assert (change < 1e-9) == invariant


@pytest.mark.slow
def test_the_trainer_example_runs(tmp_path):
    pytest.importorskip("accelerate")
    example = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    args = ["--out", str(tmp_path), "--steps", "4", "--batch", "2", "--train-len", "16", "--multiples", "1,2"]
    args += ["--eval-windows", "1", "--max-docs", "30", "--hidden", "16"]
    subprocess.run([sys.executable, str(example), *args], check=True, capture_output=True, timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["spec"] for r in results] == ["dape", "rope"]
    assert all(r["scores"]["2"]["length"] == 32 for r in results)


@pytest.mark.parametrize("use_cache", [False, True], ids=["block_mask", "no_mask"])
@pytest.mark.parametrize("spec", ["rope", "alibi", "cope+rope", "dape[base=kerple_log]", "nope"])
def test_padding_free_packed_batches_equal_each_document_alone(spec, use_cache):
    """DataCollatorWithFlattening's batch (one row, position_ids restarting per document, no mask):
    transformers hands over a block-causal mask (use_cache=False) or none (a cache skips its packing
    detection); either way poslab reads the documents from position_ids and runs each alone."""
    model = applied(spec).double()
    docs = [torch.randint(1, VOCAB, (n,)).tolist() for n in (5, 9, 3)]
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache)
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            torch.testing.assert_close(packed.logits[0, start : start + len(doc)], alone, atol=1e-9, rtol=0)
            start += len(doc)


@pytest.mark.parametrize("spec", ["dape", "cope+rope"])
def test_apply_to_a_bfloat16_model_gives_the_encoding_its_dtype(spec, tmp_path):
    """Before, DAPE stayed float32 on a bfloat16 model and refused its queries at the first forward;
    ``from_pretrained(..., dtype=torch.bfloat16)`` failed the same way."""
    model = hf.apply(tiny().to(torch.bfloat16), spec)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(tokens(2, 12)).logits.dtype == torch.bfloat16
    hf.apply(tiny(), spec).save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded(tokens(2, 12)).logits.dtype == torch.bfloat16


def test_apply_names_an_option_of_the_wrong_type():
    with pytest.raises(ValueError, match="option width must be int"):
        hf.apply(tiny(), "dape[width=1.5]")
