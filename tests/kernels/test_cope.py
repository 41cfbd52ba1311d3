"""The native CoPE row kernel (kernels/cope_rows.cpp) through ``cope_attention``: against a naive
float64 reference, gradients included, on both backward strategies and every build this CPU runs;
its guard, and the PyTorch fallback."""

from __future__ import annotations

import json
import math

import pytest
import torch

import poslab
from poslab.kernels import cope, native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler on this machine")

LEVELS = [level for level in native.supported_levels() if level in ("x86-64-v3", "x86-64-v4")]
BUILDS = [*LEVELS, "native"]


def reference(q, k, v, table, bias, keep, npos_max):
    """CoPE attention written from the paper (arXiv 2405.18719, eq. 3 to 5), float64: positions as an
    explicit sum of the gates over t = j..i (a product with an upper-triangular ones matrix, no
    cumulative sums), the table interpolated row by row, then a masked softmax."""
    scale = 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    gates = torch.sigmoid(scores) * keep
    s = scores.shape[-1]
    upper = (torch.arange(s)[:, None] >= torch.arange(s)[None, :]).to(q.dtype)  # [t, j] = t >= j
    pos = (gates @ upper).clamp(max=npos_max - 1)
    lo, hi = pos.floor(), pos.ceil()
    emb_lo, emb_hi = table[lo.long()], table[hi.long()]  # (B, H, T, S, Dh)
    emb = emb_lo + (pos - lo)[..., None] * (emb_hi - emb_lo)
    logits = scores + (q[..., None, :] * emb).sum(-1) * scale
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v


def random_case(dtype, *, t=7, s=37, npos_max=64, with_bias=False, offset=None, std=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).requires_grad_()

    q, k, v = rand(2, 3, t, 8, std=std), rand(2, 3, s, 8, std=std), rand(2, 3, s, 8)
    table = rand(npos_max, 8)
    bias = rand(3, t, s) if with_bias else None
    offset = s - t if offset is None else offset
    keep = torch.ones(t, s, dtype=torch.bool).tril(offset)  # causal: query i is at position i + offset
    grad = torch.randn(2, 3, t, 8, generator=gen, dtype=torch.float64).to(dtype)
    return (q, k, v, table, bias, keep, npos_max), grad


def gradients(fn, args, grad):
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for x in inputs:
        x.grad = None
    out = fn(*args)
    out.backward(grad)
    return out.detach(), [x.grad.clone() for x in inputs]


def as64(args):
    """The floating tensors in float64 (leaves, with gradients where the originals have them)."""
    return [
        a.detach().double().requires_grad_(a.requires_grad)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    ]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        dict(),  # causal block at the end of the sequence, positions below npos_max
        dict(npos_max=3),  # positions clamped at 2 on most keys
        dict(with_bias=True),  # a base bias with a gradient (e.g. cope+alibi-like compositions)
        dict(t=5, s=5, offset=0),  # the block at the start: the first row sees one key
        dict(offset=100),  # no mask (keep all True): every row sees every key
        dict(std=12.0),  # gates exactly 0 or 1: whole positions, where ceil p = floor p
    ],
    ids=["causal", "clamped", "bias", "square", "all-visible", "saturated"],
)
def test_forward_and_backward_equal_the_reference(case, save, dtype, build, monkeypatch):
    monkeypatch.setenv("POSLAB_NATIVE_ARCH", build)
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    args, grad = random_case(dtype, **case)
    q, k, v, table, bias, keep, npos_max = args
    assert cope.prefix_lengths(keep, q.shape[2], k.shape[2]) is not None
    assert cope.uses_native(q, k, v, table, bias)
    assert f"cope_rows-{build}-" in native.cope_library()._name  # one library per level
    calls = []
    for name in ("cope_rows_backward_", "cope_rows_backward_saved_"):
        original = getattr(native, name)

        def counted(*a, name=name, original=original, **kw):
            calls.append(name)
            return original(*a, **kw)

        monkeypatch.setattr(native, name, counted)
    save_bytes = 2**30 if save else 0
    got, got_grads = gradients(lambda *a: cope.cope_attention(*a, save_bytes=save_bytes), args, grad)
    # the native backward ran: from the kept probabilities and gates, or recomputing from the scores
    assert calls == (["cope_rows_backward_saved_"] if save else ["cope_rows_backward_"])
    want, want_grads = gradients(reference, as64(args), grad.double())
    # float32: logits of size ~std^2 round to ~1e-7 std^2 (the saturated case's are in the hundreds)
    atol = 2e-5 * max(1.0, case.get("std", 2.0) / 2) ** 2
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": atol, "rtol": 1e-4}
    torch.testing.assert_close(got.double(), want, **tol)
    assert len(got_grads) == len(want_grads) == (5 if bias is not None else 4)
    for name, g, w in zip(["q", "k", "v", "table", "bias"], got_grads, want_grads, strict=False):
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_split_the_rows_without_changing_the_result(threads, monkeypatch):
    """Rows go to threads by query index; the bias gradient sums over the batch per row, so no races."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    monkeypatch.setattr(native, "MIN_PARALLEL_WORK", 0 if threads > 1 else 2**62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    args, grad = random_case(torch.float64, t=11, with_bias=True)
    got, got_grads = gradients(cope.cope_attention, args, grad)
    want, want_grads = gradients(reference, as64(args), grad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_long_rows_keep_the_float32_accuracy_of_the_pytorch_kernel(monkeypatch):
    """Positions summed over 4,096 gates: a running sum from the last key back, in double, is no
    worse than the PyTorch kernel's cumulative sum of the flipped gates."""
    gen = torch.Generator().manual_seed(1)
    s = 4096
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, s, 16, generator=gen)
    v, table = torch.randn(1, 1, s, 16, generator=gen), torch.randn(64, 16, generator=gen) * 3
    args = (q, k, v, table, None, None, 64)
    want = reference(*as64(args)[:5], torch.ones(1, s, dtype=torch.bool), 64)
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    got = cope.cope_attention(*args)
    monkeypatch.setenv("POSLAB_NATIVE", "0")
    via_torch = cope.cope_attention(*args)
    err_native = (got.double() - want).abs().max().item()
    err_torch = (via_torch.double() - want).abs().max().item()
    assert err_native < 1e-5 and err_native <= 2 * err_torch + 1e-7


def test_other_visibility_patterns_take_the_pytorch_path(monkeypatch):
    """The kernel assumes every row sees a prefix of the keys; any other ``keep`` (e.g. keys given
    out of order) goes to the PyTorch kernel, with the same result as the reference."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    args, grad = random_case(torch.float64)
    q, k, v, table, bias, keep, npos_max = args
    scattered = keep.clone()
    scattered[:, 0] = False  # the first key hidden from every row: not a prefix
    assert cope.prefix_lengths(scattered, *scattered.shape) is None
    monkeypatch.setattr(native, "cope_rows_forward", lambda *a, **kw: pytest.fail("native path taken"))
    out = cope.cope_attention(q, k, v, table, bias, scattered, npos_max)
    torch.testing.assert_close(out, reference(q, k, v, table, bias, scattered, npos_max))


def test_inference_uses_the_kernel_without_a_graph(monkeypatch):
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    args, _ = random_case(torch.float32)
    calls = []
    original = native.cope_rows_forward
    monkeypatch.setattr(native, "cope_rows_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        out = cope.cope_attention(*args)
    assert calls == [1] and not out.requires_grad
    torch.testing.assert_close(out.double(), reference(*as64(args)).detach(), atol=2e-5, rtol=1e-4)


def test_switched_off_falls_back_to_the_pytorch_path(monkeypatch):
    monkeypatch.setenv("POSLAB_NATIVE", "0")
    monkeypatch.setattr(native, "cope_rows_forward", lambda *a, **kw: pytest.fail("native path taken"))
    args, grad = random_case(torch.float64)
    assert not cope.uses_native(*args[:4])
    got, got_grads = gradients(cope.cope_attention, args, grad)
    want, want_grads = gradients(reference, as64(args), grad)
    torch.testing.assert_close(got, want)
    assert not native.cope_supports(torch.zeros(1, dtype=torch.bfloat16))


def test_attend_matches_the_eager_path_through_the_model_api(monkeypatch):
    """poslab.attend with CoPE (blockwise, several query blocks) equals the eager reference path."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    enc = poslab.build_encoding("cope", n_heads=2, head_dim=8, npos_max=8)
    with torch.no_grad():
        enc.pos_emb.normal_()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, 2, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    calls = []
    original = native.cope_rows_forward
    monkeypatch.setattr(native, "cope_rows_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    got = poslab.attend(q, k, v, enc, block_size=16)
    assert len(calls) == 3  # three query blocks, each through the kernel
    want = poslab.attend(q, k, v, enc, impl="eager")
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (q, k, v, enc.pos_emb))
    grads_want = torch.autograd.grad(want.sum(), (q, k, v, enc.pos_emb))
    for g, w in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(g, w)


def test_the_guard_times_once_caches_beside_the_library_and_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("POSLAB_NATIVE", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    native._cope_library.cache_clear()
    try:
        q = torch.randn(1, 4, 6, 16)
        calls = []

        def slower(head_dim, dtype):
            calls.append((head_dim, dtype))
            return {"native": 2.0, "torch": 1.0}

        monkeypatch.setattr(cope, "time_both_paths", slower)
        assert not cope.uses_native(q) and not cope.uses_native(q)
        assert calls == [(16, torch.float32)]  # timed once per process
        (guard,) = tmp_path.glob("*.guard.json")
        assert guard.name.startswith("cope_rows-") and guard.with_suffix("").with_suffix(".so").exists()
        cached = json.loads(guard.read_text())
        assert cached == {"cope-d16-float32": {"native": 2.0, "torch": 1.0, "native_wins": False}}

        monkeypatch.setattr(native, "_decisions", {})  # a new process: reads the file, times nothing
        monkeypatch.setattr(cope, "time_both_paths", lambda *a: pytest.fail("timed again"))
        cached["cope-d16-float32"]["native_wins"] = True
        guard.write_text(json.dumps(cached))
        assert cope.uses_native(q)
        monkeypatch.setenv("POSLAB_NATIVE", "0")
        assert not cope.uses_native(q)
        monkeypatch.setenv("POSLAB_NATIVE", "1")
        cached["cope-d16-float32"]["native_wins"] = False
        guard.write_text(json.dumps(cached))
        monkeypatch.setattr(native, "_decisions", {})
        assert cope.uses_native(q)  # forced
    finally:
        native._cope_library.cache_clear()


def test_the_guard_timing_measures_both_paths():
    timing = cope.time_both_paths(8, torch.float32, rounds=1)
    assert set(timing) == {"native", "torch"} and all(0 < x < 10 for x in timing.values())


def test_a_failed_build_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "COPE_SOURCE", broken)
    native._cope_library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the native CoPE kernel failed"):
            assert not native.cope_supports(torch.zeros(1))
        assert sorted(tmp_path.iterdir()) == [broken]  # no half-written library left
        args, grad = random_case(torch.float64)
        torch.testing.assert_close(cope.cope_attention(*args), reference(*as64(args)))
    finally:
        native._cope_library.cache_clear()


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    scores, z, row_len = torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4), torch.full((3,), 5)
    lse = torch.empty(1, 2, 3)
    native.cope_rows_forward(scores, z, None, row_len, probs=scores.clone(), lse=lse)
    for change, message in (
        (dict(row_len=torch.full((3,), 6)), "at most 5"),
        (dict(row_len=torch.full((2,), 5)), r"row_len must be a CPU int64 tensor of shape \(3,\)"),
        (dict(z=torch.randn(1, 2, 2, 4)), r"z \(B, H, t, P\)"),
        (dict(bias=torch.randn(2, 3, 4)), r"bias must be \(2, 3, 5\)"),
        (dict(lse=torch.empty(1, 2, 3, dtype=torch.float64)), "contiguous CPU tensor of torch.float32"),
        (dict(probs=torch.randn(1, 2, 5, 3).transpose(-1, -2)), "contiguous"),
    ):
        args = {
            **dict(scores=scores, z=z, bias=None, row_len=row_len, probs=scores.clone(), lse=lse),
            **change,
        }
        with pytest.raises(ValueError, match=message):
            native.cope_rows_forward(**args)


@pytest.mark.parametrize("level", ["x86-64-v3", "x86-64-v4"])
def test_every_x86_level_compiles_even_where_it_cannot_run(level, tmp_path, monkeypatch):
    """The AVX-512 build (16-float vectors) must at least compile on a CPU without AVX-512."""
    if not native.supported_levels():
        pytest.skip("not an x86-64 CPU")
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    path = native._build_cope(native._compiler(), level)
    assert path.exists() and path.name.startswith(f"cope_rows-{level}-")


@pytest.mark.parametrize("path", ["native", "torch", "eager"])
@pytest.mark.parametrize("spec", ["cope", "cope+rope"])
def test_a_nan_in_a_query_gives_a_nan_row_as_other_encodings_do(monkeypatch, path, spec):
    """Before, the native kernel turned a NaN row into finite numbers (and indexed its table with
    the integer of NaN) and the PyTorch paths failed in gather with an index out of bounds."""
    monkeypatch.setenv("POSLAB_NATIVE", "1" if path == "native" else "0")
    enc = poslab.build_encoding(spec, n_heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    q[0, 0, 3, 2] = float("nan")
    out = poslab.attend(q, k, v, enc, impl="eager" if path == "eager" else "auto")
    alibi = poslab.attend(q, k, v, poslab.build_encoding("alibi", n_heads=2, head_dim=8))
    assert torch.equal(out.isnan(), alibi.isnan()) and out[0, 0, 3].isnan().all()


def op_inputs(dtype, *, with_bias: bool, grad: bool):
    """Small inputs of the block ops (q, k, v, table, bias, keep, npos_max), leaves with gradients
    when ``grad``; the bias (H, t, S), contiguous, as the native op takes it."""
    args, _ = random_case(dtype, t=5, s=9, npos_max=6, with_bias=with_bias)
    q, k, v, table, bias, keep, npos_max = args
    q, k, v, table, bias = (
        None if x is None else x.detach().requires_grad_(grad) for x in (q, k, v, table, bias)
    )
    return q, k, v, table, bias, keep, npos_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("op", ["cope_block", "cope_rows_block"])
def test_the_block_ops_pass_opcheck(op, with_bias, save, dtype):
    """Schema (no input mutated, no output aliased), fake (meta) implementation, autograd
    registration and AOT dispatch (dynamic shapes included) of each forward op, in training and in
    inference, and of its backward op, as torch.compile uses them."""
    q, k, v, table, bias, keep, npos_max = op_inputs(dtype, with_bias=with_bias, grad=True)
    extra = (npos_max,) if op == "cope_block" else ()
    forward, backward = getattr(cope, op), getattr(cope, f"{op}_backward")
    torch.library.opcheck(forward, (q, k, v, table, bias, keep, *extra, save, True))
    plain = [None if x is None else x.detach() for x in (q, k, v, table, bias)]
    torch.library.opcheck(forward, (*plain, None, *extra, save, False))  # inference, all keys visible
    out, saved = forward(*plain, keep, *extra, save, True)
    assert len(saved) == ((2 if op == "cope_rows_block" else 6) if save else 1)
    grad = torch.randn_like(out)
    torch.library.opcheck(backward, (grad, *plain, keep, out, saved, *extra, with_bias))


def test_the_native_op_refuses_keys_that_are_not_a_prefix():
    """Under torch.compile ``cope_attention`` cannot look at ``keep`` before taking the native op:
    the op itself raises for a pattern the kernel would compute wrongly."""
    q, k, v, table, bias, keep, _ = op_inputs(torch.float32, with_bias=False, grad=False)
    scattered = keep.clone()
    scattered[:, 0] = False
    with pytest.raises(ValueError, match="visible keys must be a prefix"):
        cope.cope_rows_block(q, k, v, table, bias, scattered, False, False)
