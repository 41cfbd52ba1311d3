"""Query-blocked attention and the fused CoPE/DAPE kernels equal the eager float64 reference."""

from __future__ import annotations

import pytest
import torch

import poslab
from conftest import ALL_ENCODINGS
from poslab.kernels import bias as bias_kernels


def encoding64(name: str, n_heads: int = 2, head_dim: int = 8) -> poslab.PositionEncoding:
    enc = poslab.build_encoding(name, n_heads=n_heads, head_dim=head_dim).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return enc


def run(enc, q, k, v, **kwargs):
    """Output and gradients of (q, k, v, every encoding parameter) under a fixed random probe."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if enc.queries_as_extra_keys:  # selective reads the queries of every key: fixed ones, then q
        b, h, s, d = k.shape
        past = torch.randn(b, h, s - q.shape[2], d, generator=torch.Generator().manual_seed(3), dtype=k.dtype)
        kwargs["extra_keys"] = torch.cat((past, inputs[0]), dim=2)
    elif "input_keys" in enc.hooks:  # CoPE's sep_key and FoX read the layer input: a fixed random one
        b, h, s, d = k.shape
        x = torch.randn(b, s, h * d, generator=torch.Generator().manual_seed(2), dtype=k.dtype)
        kwargs["extra_keys"] = enc.input_keys(x)
    out = poslab.attend(*inputs, enc, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = list(enc.parameters())
    grads = torch.autograd.grad((out * probe).sum(), inputs + params, allow_unused=True)
    return out, grads


@pytest.fixture(autouse=True, params=["native", "torch"])
def dape_impl(request, monkeypatch):
    """Every test runs with DAPE's native (C++) MLP and with its PyTorch path."""
    monkeypatch.setenv("POSLAB_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.fixture(params=[0, 2**28], ids=["recompute", "save"])
def save_bytes(request, monkeypatch):
    """Both backward strategies of the fused kernels: recompute every block, or keep what fits."""
    monkeypatch.setattr(poslab.attention, "SAVE_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_blocks_equal_the_eager_reference(name, causal, save_bytes):
    enc = encoding64(name)
    if not causal and not enc.supports_bidirectional:
        pytest.skip(f"{name} is defined for decoders only")
    q, k, v = (torch.randn(2, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    ref_out, ref_grads = run(enc, q, k, v, causal=causal, impl="eager")
    for block in (1, 3, 16):
        out, grads = run(enc, q, k, v, causal=causal, block_size=block)
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            if g_ref is None:
                assert g is None or torch.count_nonzero(g) == 0
            else:
                torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_blocks_with_offset_queries(name):
    """Cached decoding shape: the last 5 of 12 positions, in blocks of 2."""
    enc = encoding64(name)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(2))
    ref, _ = run(enc, q, k, v, impl="eager")
    out, _ = run(enc, q, k, v, block_size=2)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


def test_sdpa_with_bias_goes_blockwise_when_large(monkeypatch):
    """Past SDPA_BIAS_ELEMENTS a bias encoding runs SDPA block by block, with the same result."""
    import poslab.attention as attention

    enc = encoding64("kerple_log")
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    whole, _ = run(enc, q, k, v)
    calls = []
    original = attention.blockwise_attention
    monkeypatch.setattr(attention, "SDPA_BIAS_ELEMENTS", 100)
    monkeypatch.setattr(
        attention, "blockwise_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    blocked, _ = run(enc, q, k, v, block_size=8)
    assert calls, "the blockwise path was not taken"
    torch.testing.assert_close(blocked, whole)


@pytest.mark.parametrize(
    "name",
    ["cope", "cope+alibi", "dape", "dape[base=kerple_log]", "dape[form=A+f(A,B)]", "dape[kernel_size=3]"],
)
def test_fused_kernels_stay_within_the_error_budget(name):
    """In float32 the fused kernel may be at most ~2x as wrong as the eager path (flash-attention's
    rule), both measured against the float64 reference; gradients too."""
    enc64 = encoding64(name, n_heads=4, head_dim=16)
    enc32 = poslab.build_encoding(name, n_heads=4, head_dim=16)
    enc32.load_state_dict(enc64.state_dict())
    enc32 = enc32.float()
    q, k, v = (torch.randn(2, 4, 64, 16, dtype=torch.float64) for _ in range(3))
    ref_out, ref_grads = run(enc64, q, k, v, impl="eager")
    eager_out, eager_grads = run(enc32, q.float(), k.float(), v.float(), impl="eager")
    fast_out, fast_grads = run(enc32, q.float(), k.float(), v.float(), block_size=16)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(fast_out, ref_out) <= 2 * err(eager_out, ref_out) + 1e-6
    for fast, eager, ref in zip(fast_grads, eager_grads, ref_grads, strict=True):
        assert err(fast, ref) <= 2 * err(eager, ref) + 1e-5


def test_auto_block_size():
    from poslab.attention import BLOCK_ELEMENTS, auto_block_size

    assert auto_block_size(8, 4, 512, 512) == BLOCK_ELEMENTS // (8 * 4 * 512)
    assert auto_block_size(1, 4, 16384, 16384) == 32
    assert auto_block_size(1, 1, 10, 10) == 10  # never more than the queries
    assert auto_block_size(64, 64, 4096, 4096) == 16  # never below 16


@pytest.mark.parametrize("name", ["dape[base=kerple_log]", "cope+alibi"])
def test_saving_block_kernels_survive_a_second_backward(name, save_bytes):
    """With the intermediates kept for backward, retain_graph must give the same gradients twice."""
    enc = encoding64(name)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = poslab.attend(q, k, v, enc, block_size=4)
    first = torch.autograd.grad(out.sum(), (q, k, v, *enc.parameters()), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v, *enc.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_save_budget_is_split_between_blocks(monkeypatch, dape_impl):
    """Each block keeps its intermediates only if they fit in its share of SAVE_BYTES."""
    from poslab.kernels import dape as dape_kernel

    decisions = []
    name = "native_block" if dape_impl == "native" else "torch_block"
    original = getattr(dape_kernel, name)
    # a[-2:] = (save, train): record the save decision of the blocks that train
    monkeypatch.setattr(dape_kernel, name, lambda *a: (a[-1] and decisions.append(a[-2])) or original(*a))
    enc = poslab.build_encoding("dape", n_heads=2, head_dim=8, width=4)
    q, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    # Bytes kept per (query, key): the scores and probabilities, 2H floats, natively; the features,
    # hidden map and probabilities, 2H + 1 + D + H = 11 floats, in PyTorch.
    # Blocks of 4 queries see 4 and 8 keys.
    per_entry = 4 * (2 * 2 if dape_impl == "native" else 11)
    monkeypatch.setattr(poslab.attention, "SAVE_BYTES", 2 * per_entry * 4 * 4)
    poslab.attend(q, k, v, enc, block_size=4)
    assert decisions == [True, False]
    decisions.clear()
    with torch.no_grad():
        poslab.attend(q, k, v, enc, block_size=4)
    assert decisions == []  # inference keeps nothing for a backward


@pytest.mark.parametrize(
    "name",
    [
        "cope",
        "cope+rope",
        "dape",
        "dape[base=kerple_log]",
        "dape[base=rope]",
        "dape[kernel_size=3,base=rope]",
    ],
)
def test_inference_path_of_fused_kernels_equals_the_eager_reference(name):
    """Without gradients the kernels keep nothing for a backward; the output must not change."""
    enc = encoding64(name)
    q, k, v = (torch.randn(2, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    ref, _ = run(enc, q, k, v, impl="eager")
    with torch.no_grad():
        for block in (1, 4, 16):
            torch.testing.assert_close(
                poslab.attend(q, k, v, enc, block_size=block), ref, atol=1e-10, rtol=1e-9
            )
        # a decoding step: the last query alone against all keys
        last = poslab.attend(q[:, :, -1:], k, v, enc)
        torch.testing.assert_close(last, ref[:, :, -1:], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", ["dape", "dape[kernel_size=3]", "dape[base=rope,kernel_size=3]"])
def test_native_mode_takes_the_native_kernel(name, dape_impl):
    """The 'native' half of these tests must not pass by falling back: DAPE and V2 (kernel size 3)
    run in C++ when forced on; V2 with another kernel size stays on its eager path."""
    from poslab.kernels import dape as dape_kernel

    enc = encoding64(name)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    assert enc.runs_natively(q) == (dape_impl == "native")
    wide = encoding64("dape[kernel_size=5]")
    assert not wide.runs_natively(q)
    calls = []
    original = dape_kernel.native_block
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dape_kernel, "native_block", lambda *a: calls.append(1) or original(*a))
        k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(2))
        poslab.attend(q.requires_grad_(), k, v, enc, block_size=2).sum().backward()
        poslab.attend(q, k, v, wide, block_size=2).sum().backward()
    assert len(calls) == (2 if dape_impl == "native" else 0)  # two blocks of V1/V2, none for k = 5


@pytest.mark.parametrize("name", ["cope", "dape"])
def test_block_temporaries_live_in_reused_scratch_buffers(name, save_bytes, dape_impl):
    """A library user's process has glibc's default allocator (fresh pages for every large tensor):
    the kernels' per-block temporaries come from buffers reused across blocks and calls instead, and
    reusing them changes no result."""
    from poslab.kernels import common

    common.release_scratch()
    enc = encoding64(name)
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    first = run(enc, q, k, v, block_size=4)
    pool = {key: t.data_ptr() for key, t in common._scratch.pool.items()}
    assert ("grad_logits", torch.float64, False) in pool
    with torch.inference_mode():  # buffers made here could not be written outside inference mode
        poslab.attend(q, k, v, enc, block_size=4)
    if name == "cope" or dape_impl == "native":  # DAPE's PyTorch MLP keeps its own tensors
        assert any(key[0].startswith(f"{name}_") for key in pool)
    second = run(enc, q, k, v, block_size=4)
    after = {key: t.data_ptr() for key, t in common._scratch.pool.items() if not key[2]}
    assert after == pool  # reused, not regrown
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_triton_impl_refusals(monkeypatch):
    """impl='triton' names what is missing (triton, a device it can run on); 'auto' never needs it.
    Runs with or without triton installed (the kernels' own tests are in tests/kernels)."""
    from poslab.kernels import triton as triton_kernels

    encoding = poslab.build_encoding("alibi", n_heads=2, head_dim=16)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in "qkv")
    if triton_kernels.available() and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            poslab.attend(q, k, v, encoding, impl="triton")
    monkeypatch.setattr(triton_kernels, "_AVAILABLE", False)
    with pytest.raises(ValueError, match="needs triton"):
        poslab.attend(q, k, v, encoding, impl="triton")
    poslab.attend(q, k, v, encoding, impl="auto")


@pytest.mark.parametrize("n_queries", [13, 4])  # a full forward, and queries after cached keys
@pytest.mark.parametrize("name", ["pope", "nope"])
def test_values_narrower_than_queries_stay_narrow_and_equal_the_eager_reference(name, n_queries, monkeypatch):
    """PoPE doubles q and k, not v (and here v is narrower for NoPE too): a full forward runs
    `causal_attention` with v as it is; queries after cached keys widen v for SDPA's flash kernel.
    Both must give the eager path's outputs and gradients."""
    enc = encoding64(name)
    q, k = torch.randn(2, 2, n_queries, 8, dtype=torch.float64), torch.randn(2, 2, 13, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 13, 3, dtype=torch.float64)
    widths, op_widths = [], []
    sdpa, flash = torch.nn.functional.scaled_dot_product_attention, bias_kernels._flash
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: widths.append(v.shape[-1]) or sdpa(q, k, v, **kw),
    )
    monkeypatch.setattr(
        bias_kernels, "_flash", lambda q, k, v, mask: op_widths.append(v.shape[-1]) or flash(q, k, v, mask)
    )
    ref_out, ref_grads = run(enc, q, k, v, impl="eager")
    out, grads = run(enc, q, k, v)
    if n_queries == 13:
        assert op_widths == [3] and not widths
    else:
        assert widths and all(w == (16 if name == "pope" else 8) for w in widths) and not op_widths
    torch.testing.assert_close(out, ref_out)
    assert len(grads) == (4 if name == "pope" else 3)  # q, k, v, and PoPE's phase bias
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_attention_weights_and_full_extra_keys_follow_the_encodings_hooks():
    logits = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    pos = torch.arange(5)
    hidden = torch.ones(5, 5, dtype=torch.bool).triu(1)
    softmax = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
    weights_of = poslab.attention.attention_weights
    torch.testing.assert_close(weights_of(None, logits, pos, pos, causal=True), softmax)
    torch.testing.assert_close(weights_of(encoding64("alibi"), logits, pos, pos, causal=True), softmax)
    stick = encoding64("stickbreaking")
    weights = weights_of(stick, logits, pos, pos, causal=True)
    torch.testing.assert_close(weights, stick.normalize(logits, pos, pos, causal=True))
    assert not torch.allclose(weights, softmax)

    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    assert poslab.attention.full_extra_keys(encoding64("rope"), q, x) is None
    assert poslab.attention.full_extra_keys(encoding64("selective"), q, x) is q
    fox = encoding64("fox")
    torch.testing.assert_close(poslab.attention.full_extra_keys(fox, q, x), fox.input_keys(x))
