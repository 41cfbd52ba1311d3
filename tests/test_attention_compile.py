"""``poslab.attend`` under ``torch.compile(fullgraph=True)``: one graph, no break, and the same outputs
and gradients as eager mode (docs/attention-paths.md, torch.compile).

The backend is ``aot_eager`` (AOTAutograd's forward and backward graphs, run by eager kernels): it
traces exactly what inductor would, without compiling C++, so a test takes a second or two.
"""

from __future__ import annotations

import pytest
import torch

import poslab
from poslab.kernels import native

BIASES = ["alibi", "kerple_log", "kerple_power", "t5", "fire", "sandwich"]
LOGITS = ["cope", "cope+rope", "dape", "dape[kernel_size=3]", "dape[base=rope]"]
# The block op each logits encoding runs in, with the native kernels on and off (V2 has no PyTorch op).
NATIVE_OPS = {"cope": "cope_rows_block", "cope+rope": "cope_rows_block"} | dict.fromkeys(
    LOGITS[2:], "dape_mlp_block"
)
TORCH_OPS = {
    "cope": "cope_block",
    "cope+rope": "cope_block",
    "dape": "dape_block",
    "dape[base=rope]": "dape_block",
}


# PoPE's v is narrower than its doubled q and k (`poslab.kernels.bias.causal_attention`); relative
# PE's bias is read from its (B, H, T, rows) table q r^T.
OTHER_OPS = {"pope": {"bias_attention"}, "relative": {"table_bias_attention"}}


def expected_ops(name: str, *, native_on: bool) -> set[str]:
    """The poslab ops a compiled attend with ``name`` must call (none for plain SDPA and the eager
    path): the logits encodings' block op, and the biases' SDPA with a bias gradient
    (`poslab.kernels.bias`; the tests take gradients, so it is always on)."""
    table = NATIVE_OPS if native_on and native._compiler() is not None else TORCH_OPS
    ops = ({table[name]} if name in table else set()) | ({"bias_attention"} if name in BIASES else set())
    return ops | OTHER_OPS.get(name, set())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own function (no recompilation limit shared between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def encoding64(name: str) -> poslab.PositionEncoding:
    enc = poslab.build_encoding(name, n_heads=2, head_dim=8, causal=True).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return enc


def outputs_and_grads(fn, enc, q, k, v):
    """fn(q, k, v) and the gradients of (q, k, v, every encoding parameter) under a fixed probe."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = [p for p in enc.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * probe).sum(), inputs + params, allow_unused=True)
    return out.detach(), grads


def check_compiled_equals_eager(enc, q, k, v, **kwargs) -> set[str]:
    """Compile attend with ``enc``, compare with eager; the poslab ops in the traced graph."""

    def attention(q, k, v):
        return poslab.attend(q, k, v, enc, **kwargs)

    ops = set()

    def backend(graph, example_inputs):
        for node in graph.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("poslab."):
                ops.add(str(node.target).removeprefix("poslab.").removesuffix(".default"))
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    want, want_grads = outputs_and_grads(attention, enc, q, k, v)
    got, got_grads = outputs_and_grads(compiled, enc, q, k, v)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    return ops


def qkv(n_queries: int = 12, n_keys: int = 12):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, n_queries, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n_keys, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("name", ["nope", "rope", "pope", *BIASES, "relative", *LOGITS, "selective"])
def test_a_full_forward_compiles_and_equals_eager(name, monkeypatch):
    """SDPA (with the bias as a mask) for nope, rope and the biases; PoPE through the causal op
    (its v narrower than q); relative PE, CoPE and DAPE through their block ops in two query blocks
    of 6; selective (its own queries as extra keys) on the eager path."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    ops = check_compiled_equals_eager(encoding64(name), *qkv(), block_size=6)
    assert ops == expected_ops(name, native_on=True)


@pytest.mark.parametrize("name", ["alibi", "fire", "sandwich"])
def test_the_blockwise_bias_path_compiles(name, monkeypatch):
    """Biases too large for one SDPA call go query block by query block (here: every bias)."""
    monkeypatch.setattr(poslab.attention, "SDPA_BIAS_ELEMENTS", 0)
    check_compiled_equals_eager(encoding64(name), *qkv(), block_size=5)


@pytest.mark.parametrize("name", ["cope", "dape", "dape[kernel_size=3]"])
def test_the_pytorch_paths_of_the_block_kernels_compile(name, monkeypatch):
    """With the native kernels off: CoPE's and DAPE's PyTorch block ops, V2's eager path."""
    monkeypatch.setenv("POSLAB_NATIVE", "0")
    with native.switched_off():
        ops = check_compiled_equals_eager(encoding64(name), *qkv(), block_size=6)
    assert ops == expected_ops(name, native_on=False)


@pytest.mark.parametrize("name", ["rope", "alibi", "relative", "cope", "dape"])
def test_queries_after_cached_keys_compile(name, monkeypatch):
    """Default positions with fewer queries than keys (a cached continuation): the last 5 of 12."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    ops = check_compiled_equals_eager(encoding64(name), *qkv(5, 12))
    assert ops == expected_ops(name, native_on=True)


@pytest.mark.parametrize("name", ["alibi", "relative", "cope"])
def test_explicit_positions_compile_through_the_general_path(name, monkeypatch):
    """Explicit positions are tensor values a trace cannot branch on: the compiled function masks
    every key by position instead of deriving anything from them, with the same result."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    positions = torch.tensor([3, 4, 7, 8, 11])
    ops = check_compiled_equals_eager(encoding64(name), *qkv(5, 12), positions=positions, block_size=3)
    assert ops == expected_ops(name, native_on=True)


@pytest.mark.parametrize("name", ["alibi", "pope", "relative", "cope", "dape"])
def test_other_lengths_compile_with_dynamic_shapes(name, monkeypatch):
    """A new length recompiles with symbolic sizes (dynamo's automatic dynamic shapes); the block
    sizes, masks and the ops' fake implementations must hold for them."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    enc = encoding64(name)
    compiled = torch.compile(lambda q, k, v: poslab.attend(q, k, v, enc), fullgraph=True, backend="aot_eager")
    for length in (12, 20, 33):
        q, k, v = qkv(length, length)
        got, got_grads = outputs_and_grads(compiled, enc, q, k, v)
        want, want_grads = outputs_and_grads(lambda q, k, v: poslab.attend(q, k, v, enc), enc, q, k, v)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
