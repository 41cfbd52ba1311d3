"""The Triton kernels (``attend(impl="triton")``) against the eager path, float32: outputs and every
gradient (inputs and the encoding's parameters), full forward and cached decoding. Without a GPU
they run through triton's interpreter (TRITON_INTERPRET=1, set below); skipped when triton is not
installed."""

from __future__ import annotations

import pytest
import torch

# Without a GPU the kernels run through triton's interpreter: tests/conftest.py sets
# TRITON_INTERPRET=1 before any test module imports triton.
from poslab import ModelConfig, attend, build_encoding, build_model
from poslab.kernels import triton as triton_kernels

pytestmark = pytest.mark.skipif(not triton_kernels.available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n_batch, n_heads, n_queries, n_keys, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    return rand(n_batch, n_heads, n_queries, head_dim), *(
        rand(n_batch, n_heads, n_keys, head_dim) for _ in "kv"
    )


def _perturb(encoding: torch.nn.Module, seed: int) -> None:
    """Non-trivial parameters (CoPE's table starts at zero, T5's near it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoding.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def check(name, *, causal=True, n_queries=24, n_keys=24, n_heads=2, n_batch=2, seed=0, **options):
    encoding = build_encoding(name, n_heads=n_heads, head_dim=16, **options).to(DEVICE)
    _perturb(encoding, seed)
    q, k, v = _inputs(n_batch, n_heads, n_queries, n_keys, 16, seed)
    params = [p for p in encoding.parameters() if p.requires_grad]
    tensors = [q, k, v, *params]
    results = []
    for impl in ("eager", "triton"):
        out = attend(q, k, v, encoding, causal=causal, impl=impl)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
        results.append((out.detach(), torch.autograd.grad(out, tensors, grad, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    labels = ["q", "k", "v", *(n for n, p in encoding.named_parameters() if p.requires_grad)]
    for label, g, w in zip(labels, got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.abs().any(), label
            continue
        assert g is not None, f"no gradient for {label}"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


BIASES = ["alibi", "kerple_log", "kerple_power", "t5", "sandwich", "fire", "alibi+rope", "rope", "nope"]
# The interpreter runs FIRE's MLP one hidden unit at a time: a narrow one keeps the tests fast.
OPTIONS = {"fire": {"width": 4}}


@pytest.mark.parametrize("name", BIASES)
def test_bias_causal(name):
    check(name, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", BIASES)
def test_bias_cached_decoding(name):
    check(name, n_queries=5, n_keys=29, seed=1, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", ["alibi", "t5", "fire", "kerple_power"])
def test_bias_bidirectional(name):
    check(name, causal=False, n_queries=20, n_keys=20, seed=2, **OPTIONS.get(name, {}))


def test_fire_leaky_and_small_threshold():
    check("fire", activation="leaky_relu", threshold=4.0, seed=3, n_heads=3, width=8)


def test_unsupported_encoding_raises():
    encoding = build_encoding("relative", n_heads=2, head_dim=16)
    q, k, v = _inputs(1, 2, 8, 8, 16, 0)
    with pytest.raises(ValueError, match="no kernel"):
        attend(q, k, v, encoding, impl="triton")


@pytest.mark.parametrize("name", ["cope", "cope+rope"])
def test_cope_causal(name):
    check(name, n_queries=32, n_keys=32, npos_max=8)


@pytest.mark.parametrize("name", ["cope", "cope+rope"])
def test_cope_cached_decoding(name):
    check(name, n_queries=6, n_keys=27, npos_max=8, seed=4)


def test_cope_clamped_positions():
    """npos_max below the longest row: positions clamp, those gates get no gradient."""
    check("cope", n_queries=32, n_keys=32, npos_max=3, seed=5)


DAPES = ["dape", "dape[base=kerple_log]", "dape[base=nope]", "dape[base=rope]", "dape[form=A+f(A,B)]"]


@pytest.mark.parametrize("name", DAPES)
def test_dape_causal(name):
    check(name, n_queries=20, n_keys=20, n_heads=4, n_batch=1, width=8)


@pytest.mark.parametrize(("name", "width"), [("dape", 32), ("dape[base=t5]", 8)])
def test_dape_cached_decoding(name, width):
    check(name, n_queries=5, n_keys=21, n_heads=3, seed=6, width=width)


def test_dape_bidirectional():
    check("dape", causal=False, n_queries=18, n_keys=18, n_heads=2, width=8, seed=7)


@pytest.mark.parametrize("name", ["cope+rope", "alibi", "dape"])
def test_model_cached_decoding(name):
    """A model with attn_impl='triton': prompt then one token at a time through the KV cache (keys in
    buffers with spare capacity) gives the logits of the eager model's full forward."""
    torch.manual_seed(0)

    def config(impl):
        return ModelConfig(vocab_size=13, d_model=32, n_layers=1, n_heads=4, encoding=name, attn_impl=impl)

    eager = build_model(config("eager")).to(DEVICE)
    _perturb(eager, 0)
    model = build_model(config("triton")).to(DEVICE)
    model.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 13, (2, 12), device=DEVICE)
    with torch.no_grad():
        want = eager(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :8], cache=cache)] + [
            model(tokens[:, t : t + 1], cache=cache) for t in range(8, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-4, atol=1e-4)


V2 = ["dape[kernel_size=3]", "dape[kernel_size=3,v2_mask=input]"]  # the table: test_dape_v2_bidirectional


@pytest.mark.parametrize("name", V2)
def test_dape_v2_causal(name):
    check(name, n_queries=20, n_keys=20, n_heads=2, n_batch=1, width=4, seed=8)


def test_dape_v2_cached_decoding():
    check("dape[kernel_size=3]", n_queries=5, n_keys=21, n_heads=2, width=4, seed=9)  # batch 2


def test_dape_v2_bidirectional():
    check("dape[kernel_size=3,base=t5]", causal=False, n_queries=18, n_keys=18, n_batch=1, width=4, seed=10)


@pytest.mark.parametrize("name", ["alibi", "cope+rope", "dape[kernel_size=3,width=4]"])
def test_float16(name):
    """Half-precision inputs (float32 accumulation in the tile) against the float32 eager path. bf16
    is not checked here: the interpreter's bf16 dot products are wrong (triton 3.9)."""
    encoding = build_encoding(name, n_heads=2, head_dim=16).to(DEVICE)
    _perturb(encoding, 11)
    q, k, v = _inputs(1, 2, 20, 20, 16, 11)
    want = attend(q, k, v, encoding, impl="eager")
    (want_dq,) = torch.autograd.grad(want.sum(), q)
    half = [t.detach().half().requires_grad_() for t in (q, k, v)]
    got = attend(*half, encoding.half(), impl="triton")
    (got_dq,) = torch.autograd.grad(got.float().sum(), half[0])
    assert got.dtype == got_dq.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_dq.float(), want_dq, rtol=1e-2, atol=1e-2)


def test_plan():
    """Which encodings have a kernel (impl='auto' takes these on CUDA, the rest keep their paths)."""

    def plan(name, causal=True, **options):
        return triton_kernels.plan(build_encoding(name, n_heads=2, head_dim=16, **options), causal=causal)

    assert plan("rope") == "none" and triton_kernels.plan(None) == "none"
    assert plan("alibi+rope") == plan("t5") == plan("sandwich+kerple_log") == "table"
    assert plan("fire") == "fire" and plan("cope+rope") == "cope" and plan("dape[kernel_size=3]") == "dape"
    assert plan("cope", causal=False) is None and plan("cope", sep_key=True) is None
    assert plan("dape[kernel_size=5]") is None and plan("dape[base=fire]") is None
    assert plan("relative") is None and plan("fire+alibi") is None
