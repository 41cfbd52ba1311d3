"""Bad input gets a ValueError whose message names the problem."""

from __future__ import annotations

import pytest
import torch

import poslab
from poslab.encodings.base import PositionEncoding


def build(name, **options):
    return poslab.build_encoding(name, n_heads=4, head_dim=8, **options)


def test_unknown_encoding_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown encoding 'ropee'; known encodings: alibi, .*cope, .*rope"):
        build("ropee")
    with pytest.raises(ValueError, match="unknown encoding 'bogus'"):
        build("cope+bogus")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "rope",
            {"bogus": 1},
            r"unknown option\(s\) bogus for encoding 'rope'; accepted options: .*base",
        ),
        (
            "alibi",
            {"npos_max": 3},
            r"unknown option\(s\) npos_max for encoding 'alibi'; accepted options: none",
        ),
        ("cope+rope", {"width": 3}, "no part of 'cope\\+rope' accepts option 'width'"),
        ("rope", {"scaling": "bogus"}, "unknown rope scaling 'bogus'"),
        ("rope", {"factor": 0.5}, "rope factor must be >= 1, got 0.5"),
        ("cope", {"npos_max": 0}, "npos_max must be positive, got 0"),
        ("dape", {"width": -1}, "width must be positive, got -1"),
        ("dape", {"kernel_size": 2}, "kernel_size must be odd"),
        ("dape", {"form": "A+g(B)"}, "unknown dape form 'A\\+g\\(B\\)'"),
        ("dape", {"base": "cope"}, "dape base 'cope' rewrites logits"),
        ("dape", {"base": "nosuch"}, "unknown encoding 'nosuch'"),
        ("cope", {"sep_key": True, "val_gates": True}, "sep_key and val_gates are exclusive"),
        ("t5", {"n_buckets": 2}, "t5 needs n_buckets >= 4"),
        ("learned", {"max_len": 0}, "max_len must be positive, got 0"),
        ("sandwich", {"dim": 7}, "sandwich dim must be even, got 7"),
        ("cope+cope", {}, "names a part twice"),
        ("dape[width]", {}, "option 'width' has no '='"),
        ("dape[[", {}, "cannot parse encoding spec"),
    ],
)
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        build(name, **options)


def test_registries_refuse_a_taken_name_and_list_the_known_ones():
    from poslab.encodings.base import _REGISTRY
    from poslab.lab.data.corpora import CORPORA
    from poslab.lab.tasks import TASKS

    for registry, kind, taken in (
        (_REGISTRY, "encoding", "rope"),
        (TASKS, "task", "lm"),
        (CORPORA, "corpus", "stdlib"),
    ):
        with pytest.raises(ValueError, match=f"^{kind} name '{taken}' is already registered$"):
            registry.add(taken, object())
        assert registry.lookup(taken) is registry[taken]
    with pytest.raises(ValueError, match=r"^unknown task 'nosuch'; known tasks: .*flipflop"):
        TASKS.lookup("nosuch")


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="rope needs an even head_dim, got 7"):
        poslab.build_encoding("rope", n_heads=2, head_dim=7)


@pytest.mark.parametrize("field", ["n_heads", "head_dim"])
def test_non_positive_sizes(field):
    sizes = {"n_heads": 4, "head_dim": 8, field: 0}
    with pytest.raises(ValueError, match=f"{field} must be positive, got 0"):
        poslab.build_encoding("alibi", **sizes)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30}, r"model.d_model \(30\) must be divisible by model.n_heads \(4\)"),
        ({"n_layers": 0}, "model.n_layers must be a positive integer, got 0"),
        ({"norm": "mid"}, "model.norm must be one of pre, post, got 'mid'"),
        ({"dropout": 1.5}, r"model.dropout must be in \[0, 1\), got 1.5"),
        ({"encoding": "nosuch"}, "unknown encoding 'nosuch'"),
        (
            {"encoding_options": {"npos_max": 4}},
            "unknown option\\(s\\) npos_max for encoding 'rope'",
        ),
        ({"tie_embeddings": True, "n_outputs": 3}, "tie_embeddings needs n_outputs == vocab_size"),
        ({"attn_impl": "flash"}, "model.attn_impl must be one of auto, fused, eager, triton"),
        ({"d_model": 12, "n_heads": 4}, "rope needs an even head_dim, got 3"),
    ],
)
def test_model_config_validation(overrides, message):
    options = {"vocab_size": 10, "d_model": 32, "n_heads": 4, **overrides}
    with pytest.raises(ValueError, match=message):
        poslab.ModelConfig(**options)


def test_attend_shape_errors():
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"attend expects \(B, H, T, Dh\) tensors"):
        poslab.attend(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="incompatible shapes"):
        poslab.attend(q, torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match=r"positions must have shape \(5,\)"):
        poslab.attend(q, q, q, positions=torch.arange(4))
    with pytest.raises(ValueError, match="more queries \\(5\\) than keys \\(3\\)"):
        poslab.attend(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="unknown attention impl 'cuda'"):
        poslab.attend(q, q, q, impl="cuda")
    with pytest.raises(ValueError, match="encoding 'cope' rewrites logits; the fused path cannot"):
        poslab.attend(q, q, q, build("cope"), impl="fused")


def test_mode_an_encoding_does_not_support():
    class CausalOnly(PositionEncoding):
        name = "causal_only"
        supports_bidirectional = False

    enc = CausalOnly(n_heads=4, head_dim=8)
    q = torch.randn(1, 4, 3, 8)
    poslab.attend(q, q, q, enc, causal=True)
    with pytest.raises(ValueError, match="'causal_only' is not defined for bidirectional"):
        poslab.attend(q, q, q, enc, causal=False)


def test_model_input_errors():
    model = poslab.build_model(poslab.ModelConfig(vocab_size=10, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match=r"expected token ids of shape \(B, T\)"):
        model(torch.zeros(3, dtype=torch.long))
    encoder = poslab.build_model(poslab.ModelConfig(vocab_size=10, d_model=16, n_heads=2, causal=False))
    with pytest.raises(ValueError, match="a KV cache needs a causal"):
        encoder(torch.zeros(1, 3, dtype=torch.long), cache=encoder.new_cache())


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        ("rope[base=abc]", "base"),
        ("cope[npos_max=2.5]", "npos_max"),
        ("dape[width=1.5]", "width"),
        ("dape[base_options=x]", "base_options"),
        ("rope[scaling=ntk,factor=1e308]", "factor"),
        ("rope[base=inf]", "base"),
        ("alibi+cope[npos_max=nan]", "npos_max"),
    ],
)
def test_spec_values_of_the_wrong_type_are_a_value_error_naming_the_option(spec, option):
    """Before, these were a TypeError or OverflowError deep inside the class, or (inf) NaN logits."""
    with pytest.raises(ValueError, match=rf"\b{option}\b"):
        build(spec)


def test_spec_values_of_the_wrong_type_are_one_line_on_the_command_line(capsys, tmp_path):
    from poslab.lab.cli import main

    code = main(["train", "--preset", "smoke", "model.encoding=rope[base=inf]", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "base" in err and "finite" in err, err
    assert not (tmp_path / "r").exists()
