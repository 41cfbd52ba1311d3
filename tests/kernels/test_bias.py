"""``poslab.kernels.bias``: SDPA with a float mask that may need a gradient, against a naive float64
reference; its custom ops' fake implementations; its trace under torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from poslab.kernels.bias import (
    backward_block_size,
    bias_attention,
    bias_attention_backward,
    bias_attention_forward,
    causal_attention,
    table_bias_attention,
    table_bias_attention_backward,
    table_bias_attention_forward,
)


def reference(q, k, v, bias, keep):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, -1) @ v


def grads(fn, q, k, v, bias, keep, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = fn(*inputs, keep, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probe = probe.to(out.dtype)  # the same numbers in every dtype
    return out, torch.autograd.grad((out * probe).sum(), inputs)


# bias shapes: per head, shared by the heads, per head and key only
@pytest.mark.parametrize("bias_shape", ["HTS", "1TS", "H1S"])
@pytest.mark.parametrize(
    ("n_queries", "n_keys", "start"),
    [(37, 37, 0), (37, 37, None), (9, 40, 31), (1, 12, 11), (23, 23, "bidirectional")],
)
def test_bias_attention_equals_the_reference(bias_shape, n_queries, n_keys, start):
    """Outputs and the gradients of q, k, v and the bias; ``causal_start`` only skips hidden keys."""
    heads = 3
    q = torch.randn(2, heads, n_queries, 8, dtype=torch.float64)
    k, v = (torch.randn(2, heads, n_keys, 8, dtype=torch.float64) for _ in range(2))
    dims = {"HTS": (heads, n_queries, n_keys), "1TS": (1, n_queries, n_keys), "H1S": (heads, 1, n_keys)}
    bias = torch.randn(dims[bias_shape], dtype=torch.float64) * 3
    keep = None
    if start != "bidirectional":
        positions = torch.arange(n_keys - n_queries, n_keys)
        keep = torch.arange(n_keys)[None, :] <= positions[:, None]
    causal_start = start if isinstance(start, int) else None
    out, got = grads(bias_attention, q, k, v, bias, keep, causal_start=causal_start)
    ref_out, want = grads(reference, q, k, v, bias, keep)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_backward_blocks_cover_every_query(monkeypatch):
    """Blocks of 16 over 37 queries (a short last block) give the one-block result."""
    q, k, v = (torch.randn(1, 2, 37, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 37, 37, dtype=torch.float64)
    keep = torch.ones(37, 37, dtype=torch.bool).tril()
    whole = grads(bias_attention, q, k, v, bias, keep, causal_start=0)
    monkeypatch.setattr("poslab.kernels.bias.BACKWARD_ELEMENTS", 16 * 2 * 37)
    assert backward_block_size(1, 2, 37, 37) == 16
    blocked = grads(bias_attention, q, k, v, bias, keep, causal_start=0)
    for a, b in zip([whole[0], *whole[1]], [blocked[0], *blocked[1]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_probabilities_that_underflow_stay_negligible():
    """Most logits far below the row's maximum (a steep bias): their exp is floored just above the
    smallest normal float (torch's exp is 30-100x slower below it), which must not show."""
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    steps = torch.arange(64.0)
    bias = -50.0 * (steps[:, None] - steps[None, :]).abs().expand(2, 64, 64)
    out, got = grads(bias_attention, q, k, v, bias, None)
    ref_out, want = grads(reference, *(t.double() for t in (q, k, v, bias)), None)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-3)


def test_custom_ops_fake_implementations():
    q, k, v = (torch.randn(2, 2, 7, 4, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    mask.requires_grad_()
    torch.library.opcheck(bias_attention_forward, (q, k, v, mask, 0))
    out, lse = bias_attention_forward(q, k, v, mask, 0)
    # the backward op has no backward of its own: inputs without gradients
    args = tuple(t.detach() for t in (torch.randn_like(out), q, k, v, mask, out, lse))
    for start, mask_grad in ((0, True), (None, False)):
        torch.library.opcheck(bias_attention_backward, (*args, start, mask_grad))


def test_traces_whole_under_torch_compile():
    """fullgraph: the ops are opaque to the trace and their autograd is registered."""
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, 9, requires_grad=True)
    keep = torch.ones(9, 9, dtype=torch.bool).tril()

    def attention(q, k, v, bias):
        return bias_attention(q, k, v, bias, keep, causal_start=0)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, bias)
    got = torch.autograd.grad(out.sum(), (q, k, v, bias))
    want = torch.autograd.grad(attention(q, k, v, bias).sum(), (q, k, v, bias))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("width", [8, 3])  # v as wide as q, and narrower (PoPE doubles q and k)
def test_causal_attention_equals_the_reference(width, monkeypatch):
    """No mask: causal from key 0, the backward hiding later keys itself (in blocks of 16 rows),
    v kept narrow."""
    monkeypatch.setattr("poslab.kernels.bias.BACKWARD_ELEMENTS", 16 * 2 * 3 * 37)
    q, k = (torch.randn(2, 3, 37, 8, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 37, width, dtype=torch.float64)
    keep = torch.ones(37, 37, dtype=torch.bool).tril()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out * probe).sum(), inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference(*ref_inputs, 0.0, keep)
    want = torch.autograd.grad((ref_out * probe).sum(), ref_inputs)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_a_mask_per_sequence_gets_its_own_gradient():
    """A (B, H, T, S) bias: the gradient is not summed over the batch; v narrower than q."""
    q, k = (torch.randn(2, 3, 21, 8, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 21, 5, dtype=torch.float64)
    bias = torch.randn(2, 3, 21, 21, dtype=torch.float64)
    keep = torch.ones(21, 21, dtype=torch.bool).tril()
    out, got = grads(bias_attention, q, k, v, bias, keep, causal_start=0)
    ref_out, want = grads(reference, q, k, v, bias, keep)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    assert got[3].shape == bias.shape
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def naive_table_bias(table, index):
    """M[b, h, t, s] = table[b, h, t, index[t, s]], -inf where the index is the table's width, by loops."""
    n_batch, n_heads, n_queries, width = table.shape
    rows = []
    for t in range(n_queries):
        row = []
        for s in range(index.shape[1]):
            n = int(index[t, s])
            row.append(table[:, :, t, n] if n < width else table.new_full((n_batch, n_heads), float("-inf")))
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2)


# (queries, keys, the first query's position or None: an explicit index, width of the table)
TABLE_CASES = [
    (37, 37, 0, 7),
    (9, 40, 31, 7),
    (12, 12, 0, 30),
    (5, 12, 7, 1),
    (37, 37, None, 7),
    (9, 40, None, 4),
]


@pytest.mark.parametrize(("n_queries", "n_keys", "start", "width"), TABLE_CASES)
def test_table_bias_attention_equals_the_reference(n_queries, n_keys, start, width, monkeypatch):
    """Outputs and the gradients of q, k, v and the table; without an index the causal capped
    distance min(i - j, R - 1) (here R also past every distance, and R = 1: one entry per row).
    The backward in blocks of 4 rows."""
    monkeypatch.setattr("poslab.kernels.bias.BACKWARD_ELEMENTS", 4 * 2 * 3 * n_keys)
    q = torch.randn(2, 3, n_queries, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, n_keys, 8, dtype=torch.float64) for _ in range(2))
    table = torch.randn(2, 3, n_queries, width, dtype=torch.float64)
    if start is None:  # an index of any pattern, some keys hidden
        index = torch.randint(0, width + 1, (n_queries, n_keys))
        index[:, 0] = 0  # every query sees a key
        first = None
    else:
        positions = torch.arange(start, start + n_queries)
        distance = positions[:, None] - torch.arange(n_keys)[None, :]
        index = torch.where(distance >= 0, distance.clamp(max=width - 1), width)
        first = start
    inputs = [t.clone().requires_grad_() for t in (q, k, v, table)]
    out = table_bias_attention(*inputs, None if start is not None else index, causal_start=first)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out * probe).sum(), inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, table)]
    ref_out = reference(*ref_inputs[:3], naive_table_bias(ref_inputs[3], index), None)
    want = torch.autograd.grad((ref_out * probe).sum(), ref_inputs)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # inference: SDPA with the bias laid out
        plain = table_bias_attention(q, k, v, table, None if start is not None else index, causal_start=first)
    torch.testing.assert_close(plain, ref_out, atol=1e-12, rtol=1e-10)


def test_table_bias_attention_needs_consecutive_queries_without_an_index():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    table = torch.randn(1, 2, 5, 3)
    for start in (None, 1):  # no position, or queries past the last key
        with pytest.raises(ValueError, match="without an index"):
            table_bias_attention(q, k, v, table, None, causal_start=start)


def test_table_and_causal_ops_fake_implementations():
    q, k, v = (torch.randn(2, 2, 7, 4) for _ in range(3))
    table = torch.randn(2, 2, 7, 3)
    index = torch.randint(0, 4, (7, 7))
    for idx, start in ((index, None), (None, 0)):
        torch.library.opcheck(table_bias_attention_forward, (q, k, v, table, idx, start))
        out, lse = table_bias_attention_forward(q, k, v, table, idx, start)
        args = (torch.randn_like(out), q, k, v, table, idx, out, lse, start)
        torch.library.opcheck(table_bias_attention_backward, args)
    narrow = v[..., :2]
    torch.library.opcheck(bias_attention_forward, (q, k, narrow, None, 0))
    out, lse = bias_attention_forward(q, k, narrow, None, 0)
    torch.library.opcheck(
        bias_attention_backward, (torch.randn_like(out), q, k, narrow, None, out, lse, 0, False)
    )
