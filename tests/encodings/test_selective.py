"""Selective attention in query blocks: the penalty carried from block to block equals the reference."""

from __future__ import annotations

import pytest
import torch

from poslab.attention import attend
from poslab.encodings import build_encoding, selective
from poslab.encodings.selective import selection_penalty, selection_prefixes


def _naive_penalty(queries, keys, n_queries):
    """F_ij = sum_{j < t < i} relu(q_t . k_j / sqrt(D)) for keys j > 0, by loops in float64."""
    batch, n_keys, dim = keys.shape
    out = torch.zeros(batch, n_queries, n_keys, dtype=torch.float64)
    for i in range(n_queries):
        for j in range(1, n_keys):
            for t in range(j + 1, i):
                out[:, i, j] += torch.relu((queries[:, t] * keys[:, j]).sum(-1) / dim**0.5)
    return out


def test_the_penalty_from_a_prefix_equals_the_penalty_from_zero():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 13, 4, dtype=torch.float64), torch.randn(2, 13, 4, dtype=torch.float64)
    k_pos, scale = torch.arange(13), 0.5
    whole = selection_penalty(queries, keys, torch.arange(13), k_pos, scale)
    torch.testing.assert_close(whole, _naive_penalty(queries, keys, 13))
    starts = [0, 3, 4, 9]
    prefixes = selection_prefixes(queries, keys, starts, k_pos, scale)
    for start, end, prefix in zip(starts, [*starts[1:], 13], prefixes, strict=True):
        rows = torch.arange(start, end)
        penalty = selection_penalty(queries, keys, rows, k_pos, scale, (prefix, (start, end - 1)))
        torch.testing.assert_close(penalty, whole[:, rows])


@pytest.mark.parametrize("n_queries", [23, 5])  # a full forward, and cached decoding of 5 queries
@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_blockwise_selective_equals_the_eager_path_with_gradients(n_queries, block_size):
    torch.manual_seed(1)
    n_keys = 23
    enc = build_encoding("selective", n_heads=3, head_dim=8).double()
    q = torch.randn(2, 3, n_queries, 8, dtype=torch.float64, requires_grad=True)
    k, v, extra = (torch.randn(2, 3, n_keys, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    outs, grads = [], []
    for impl, size in (("eager", None), ("auto", block_size)):
        out = attend(q, k, v, enc, impl=impl, block_size=size, extra_keys=extra)
        (g,) = [torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v, extra))]
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)


def test_blocks_out_of_order_fall_back_to_summing_from_zero():
    torch.manual_seed(2)
    enc = build_encoding("selective", n_heads=2, head_dim=4).double()
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    positions = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])
    blocked = attend(q, k, v, enc, positions=positions, block_size=2, extra_keys=q)
    torch.testing.assert_close(blocked, attend(q, k, v, enc, positions=positions, impl="eager", extra_keys=q))


def test_blocks_carrying_the_penalty_compile_with_fullgraph():
    torch.manual_seed(3)
    enc = build_encoding("selective", n_heads=2, head_dim=4).double()
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def run(q, k, v):
        return attend(q, k, v, enc, block_size=4, extra_keys=q)

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    want, got = attend(q, k, v, enc, impl="eager", extra_keys=q), compiled(q, k, v)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.sum(), (q, k, v)) for out in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["selective", "selective+alibi"])  # alone, and with a bias in the mask
@pytest.mark.parametrize("n_queries", [23, 5])
def test_the_flash_block_kernel_is_taken_and_equals_the_eager_path(name, n_queries, monkeypatch):
    """The blocks run as SDPA with -penalty as a per-sequence mask (`bias_attention`), whose backward
    gives q, k, v, the queries read as extra keys and the bias's parameters their float64 gradients."""
    torch.manual_seed(4)
    enc = build_encoding(name, n_heads=3, head_dim=8).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    q = torch.randn(2, 3, n_queries, 8, dtype=torch.float64, requires_grad=True)
    k, v, extra = (torch.randn(2, 3, 23, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    calls = []
    kernel = selective.bias_attention
    monkeypatch.setattr(selective, "bias_attention", lambda *a, **o: calls.append(1) or kernel(*a, **o))
    inputs = (q, k, v, extra, *enc.parameters())
    outs, grads = [], []
    for impl in ("eager", "auto"):
        out = attend(q, k, v, enc, impl=impl, block_size=4, extra_keys=extra)
        grads.append(torch.autograd.grad((out * out.detach().sin()).sum(), inputs))
        outs.append(out)
    assert len(calls) == -(-n_queries // 4), "every query block should run the flash kernel"
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b)
