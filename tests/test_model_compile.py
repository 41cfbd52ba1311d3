"""A DecoderLM's loss under ``torch.compile(fullgraph=True)``: one graph for the whole forward (and
AOTAutograd's backward), with the loss and every parameter's gradient of eager mode."""

from __future__ import annotations

import pytest
import torch

import poslab


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("encoding", ["rope", "pope", "alibi", "relative", "cope", "dape"])
def test_a_compiled_decoder_gives_the_eager_loss_and_gradients(encoding, monkeypatch):
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    torch.manual_seed(0)
    config = poslab.ModelConfig(vocab_size=13, d_model=32, n_layers=2, n_heads=4, encoding=encoding)
    model = poslab.DecoderLM(config).double()
    idx, targets = torch.randint(0, 13, (2, 16)), torch.randint(0, 13, (2, 16))
    params = list(model.parameters())

    def loss(idx, targets):
        return model.loss(idx, targets)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(idx, targets)
    got_grads = torch.autograd.grad(got, params)
    want = loss(idx, targets)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    names = [name for name, _ in model.named_parameters()]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
