"""A decoder's encodings carry no parameters for keys after the query (issue #28).

CoPE, relative PE and Kerple give an encoder a second half (a table half or a parameter row) for
keys after the query. Built for a decoder they have the causal half alone, the papers' shapes;
decoder training is bit-identical to the two-half layout it replaced, and checkpoints saved with
that layout still load into decoders.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import poslab
import poslab.model
from poslab.lab.config import TrainConfig
from poslab.lab.train import build_optimizer
from poslab.model import ModelConfig, Transformer

H, DH = 4, 8
# encoding -> {parameter: (decoder shape, encoder shape)}
SHAPES = {
    "cope[npos_max=16]": {"pos_emb": ((16, DH), (32, DH))},
    "relative[max_dist=7]": {"pos_emb": ((8, DH), (16, DH))},
    "kerple_log": {"r1": ((H, 1, 1), (2, H)), "r2": ((H, 1, 1), (2, H))},
    "kerple_power": {"a": ((H, 1, 1), (2, H)), "p": ((H, 1, 1), (2, H))},
}
# Decoders whose encodings draw or hold a second half in the two-half layout.
DECODERS = ["kerple_log", "kerple_power", "cope", "relative", "cope+kerple_log", "dape[base=kerple_log]"]


def config(encoding: str, *, causal: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=11, d_model=H * DH, n_layers=2, n_heads=H, encoding=encoding, causal=causal)


def first_half(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The decoder's part of a two-half parameter: row 0 (Kerple) or the first rows (tables)."""
    if like.dim() == 3:
        return value[0].reshape(like.shape)
    return value[: like.shape[0]]


@pytest.mark.parametrize("spec", list(SHAPES))
def test_shapes_per_mode(spec):
    for causal, index in ((True, 0), (False, 1)):
        enc = poslab.build_encoding(spec, n_heads=H, head_dim=DH, causal=causal)
        shapes = {name: tuple(p.shape) for name, p in enc.named_parameters()}
        assert shapes == {name: pair[index] for name, pair in SHAPES[spec].items()}
    either = poslab.build_encoding(spec, n_heads=H, head_dim=DH)  # no mode: both halves
    assert {n: tuple(p.shape) for n, p in either.named_parameters()} == {
        n: pair[1] for n, pair in SHAPES[spec].items()
    }
    model = Transformer(config(spec))
    for name, (decoder, _) in SHAPES[spec].items():
        assert tuple(getattr(model.encodings[0], name).shape) == decoder


@pytest.mark.parametrize("spec", list(SHAPES))
def test_decoder_parameters_are_the_first_half_of_the_same_draw(spec):
    torch.manual_seed(3)
    both = poslab.build_encoding(spec, n_heads=H, head_dim=DH, causal=False)
    after_both = torch.rand(5)
    torch.manual_seed(3)
    dec = poslab.build_encoding(spec, n_heads=H, head_dim=DH, causal=True)
    after_dec = torch.rand(5)
    assert torch.equal(after_both, after_dec)  # the same numbers drawn: later initialisations agree
    for name, p in dec.named_parameters():
        assert torch.equal(p, first_half(name, getattr(both, name), p))


@pytest.mark.parametrize("spec", DECODERS)
def test_old_two_half_checkpoint_loads_into_a_decoder_with_identical_logits(spec):
    torch.manual_seed(0)
    # An encoder of the same config draws exactly what a decoder drew before (the two-half layout).
    old_state = Transformer(config(spec, causal=False)).state_dict()
    torch.manual_seed(0)
    new = Transformer(config(spec))
    for key, value in new.state_dict().items():
        assert torch.equal(value, first_half(key, old_state[key], value)), key
    torch.manual_seed(1)
    loaded = Transformer(config(spec))
    loaded.load_state_dict(old_state)
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    idx = torch.randint(0, 11, (2, 9))
    assert torch.equal(loaded(idx), new(idx))


def _train(model: Transformer, steps: int = 6) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.1))
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 11, (3, 12), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # small enough to clip every step
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("spec", DECODERS)
def test_decoder_training_is_bit_identical_to_the_two_half_layout(spec, monkeypatch):
    torch.manual_seed(0)
    new_losses, new_state = _train(Transformer(config(spec)))
    # The layout before: the model builds its encodings for either mode (both halves).
    build = poslab.model.build_encoding
    monkeypatch.setattr(poslab.model, "build_encoding", lambda *a, **k: build(*a, **{**k, "causal": None}))
    torch.manual_seed(0)
    old = Transformer(config(spec))
    assert sum(p.numel() for p in old.parameters()) > sum(p.numel() for p in new_state.values())
    old_losses, old_state = _train(old)
    assert new_losses == old_losses
    for key, value in new_state.items():
        assert torch.equal(value, first_half(key, old_state[key], value)), key


def test_a_checkpoint_of_another_shape_is_refused_clearly():
    dec = Transformer(config("cope[npos_max=16]"))
    state = dec.state_dict()
    state["encodings.0.pos_emb"] = torch.zeros(20, DH)
    with pytest.raises(RuntimeError, match=r"saved shape \(20, 8\) does not fit encoding 'cope' built for "):
        dec.load_state_dict(state)
    enc = Transformer(config("kerple_log", causal=False))
    with pytest.raises(RuntimeError, match="a decoder's parameter lacks the half for keys after the query"):
        enc.load_state_dict(Transformer(config("kerple_log")).state_dict())


def test_a_decoder_built_encoding_refuses_bidirectional_attention():
    q = k = v = torch.randn(1, H, 5, DH)
    for spec in ("cope", "relative", "kerple_log", "cope+rope", "dape[base=kerple_power]"):
        enc = poslab.build_encoding(spec, n_heads=H, head_dim=DH, causal=True)
        poslab.attend(q, k, v, enc, causal=True, impl="eager")
        with pytest.raises(ValueError, match="was built for causal attention"):
            poslab.attend(q, k, v, enc, causal=False, impl="eager")
    with pytest.raises(ValueError, match="unknown option"):  # the mode is no user option
        poslab.build_encoding("cope[causal=true]", n_heads=H, head_dim=DH)


def test_encoders_keep_both_halves_and_both_get_gradient():
    model = Transformer(dataclasses.replace(config("cope+kerple_log"), causal=False))
    cope, kerple = model.encodings[0].parts
    with torch.no_grad():
        cope.pos_emb.normal_()
    model(torch.randint(0, 11, (2, 9))).sum().backward()
    assert cope.pos_emb.grad[64:].abs().sum() > 0 and kerple.r1.grad[1].abs().sum() > 0
