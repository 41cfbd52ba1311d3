"""Stick-breaking's block kernel (its closed-form backward) equals the eager float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import poslab
from poslab.encodings.stickbreaking import _weights_and_gates, stick_breaking_weights


def _outputs_and_grads(enc, q, k, v, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = poslab.attend(*inputs, enc, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad((out * probe).sum(), inputs)


@pytest.mark.parametrize("save", [0, 2**28], ids=["recompute", "save"])
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("n_queries", [19, 6])  # a full forward, and queries after cached keys
@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_the_block_kernel_equals_the_eager_path_with_gradients(
    save, attend_current, n_queries, block_size, monkeypatch
):
    monkeypatch.setattr(poslab.attention, "SAVE_BYTES", save)
    torch.manual_seed(0)
    enc = poslab.build_encoding("stickbreaking", n_heads=3, head_dim=8, attend_current=attend_current)
    q = torch.randn(2, 3, n_queries, 8, dtype=torch.float64) * 2
    k, v = (torch.randn(2, 3, 19, 8, dtype=torch.float64) * 2 for _ in range(2))
    calls = []
    kernel = enc.attention_block
    monkeypatch.setattr(enc, "attention_block", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    ref_out, ref_grads = _outputs_and_grads(enc, q, k, v, impl="eager")
    out, grads = _outputs_and_grads(enc, q, k, v, block_size=block_size)
    assert calls, "the blockwise path did not reach the block kernel"
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_a_kept_block_survives_a_second_backward():
    enc = poslab.build_encoding("stickbreaking", n_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = poslab.attend(q, k, v, enc, block_size=4)
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_weights_below_the_smallest_normal_number_are_zero_and_the_rest_exact():
    """Long float32 sticks: the kernel gives 0 where the reference underflows to a subnormal (and
    up to e^2 times the smallest normal number: exp never sees what would underflow), and equals it
    everywhere else."""
    torch.manual_seed(3)
    n = 400
    q, k = torch.randn(1, 1, n, 16) * 3, torch.randn(1, 1, n, 16) * 3
    visible = torch.arange(n)[None, :] < torch.arange(n)[:, None]
    weights, gates = _weights_and_gates(q, k, visible)
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(16)
    ref = stick_breaking_weights(logits, visible)  # float64: no subnormals at these sizes
    tiny = torch.finfo(torch.float32).tiny
    small = ref < tiny
    assert small.any() and (ref[small] > 0).any(), "the test needs weights in float32's subnormal range"
    flushed = ref < tiny * math.exp(2.0) * 0.999
    assert (weights[small] == 0).all() and (weights[flushed] == 0).all()
    kept = ref > tiny * math.exp(2.0) * 1.001
    assert (weights[kept] > 0).all()
    torch.testing.assert_close(weights[~small].double(), ref[~small], rtol=1e-4, atol=1e-6)
    # The forward that keeps nothing takes the keys last to first: the same weights, flipped.
    reversed_weights, no_gates = _weights_and_gates(q, k, visible, gates=False, reverse=True)
    assert no_gates is None
    torch.testing.assert_close(reversed_weights.flip(-1), weights, rtol=1e-5, atol=0)
    assert (reversed_weights.flip(-1)[small] == 0).all()
    # The gates sigmoid(z), 0 at unseen keys (which then get no gradient).
    expected = torch.sigmoid(logits).masked_fill(~visible, 0.0)
    torch.testing.assert_close(gates.double(), expected, rtol=1e-5, atol=1e-6)
