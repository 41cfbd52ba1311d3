"""The native DAPE MLP kernel (kernels/dape_mlp.cpp): against a float64 autograd reference, its
threads, its build cache, and the PyTorch fallback when it is switched off or cannot be built."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import poslab
from poslab.kernels import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler on this machine")


def test_builds_where_there_is_a_compiler():
    """A silent fallback would leave the 'native' half of test_blockwise running the PyTorch path."""
    assert native.available()


def reference(scores, bias, w1, b1, w2, b2, row_len, add_base):
    """The MLP as docs/attention.md writes it, channels-last through F.linear, -inf past each row's
    length; with (D, C, 3) weights V2's two convolutions over the keys, features and hidden map masked."""
    n_batch = scores.shape[0]
    feats = scores if bias is None else torch.cat((scores, bias.expand(n_batch, -1, -1, -1)), dim=1)
    keep = torch.arange(scores.shape[-1]) < row_len[:, None]
    if w1.dim() == 3:
        hidden = F.leaky_relu(F.conv2d(feats * keep, w1[:, :, None], b1, padding=(0, 1)), 0.01) * keep
        mixed = F.conv2d(hidden, w2[:, :, None], b2, padding=(0, 1))
    else:
        hidden = F.leaky_relu(F.linear(feats.permute(0, 2, 3, 1), w1, b1), 0.01)
        mixed = F.linear(hidden, w2, b2).permute(0, 3, 1, 2)
    logits = scores + mixed
    if add_base and bias is not None:
        logits = logits + bias
    return logits.masked_fill(~keep, float("-inf")), keep


# The builds this CPU runs (AVX2 and, where the CPU has it, AVX-512), or the one -march=native build.
LEVELS = [level for level in native.supported_levels() if level in ("x86-64-v3", "x86-64-v4")] or ["native"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("n_heads", [3, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("has_bias,add_base", [(True, True), (True, False), (False, False)])
def test_forward_and_backward_equal_the_reference(
    has_bias, add_base, dtype, threads, n_heads, kernel_size, level, monkeypatch
):
    # 37 keys: full vectors of 4, 8 or 16 lanes and a partial one
    row_len = torch.tensor([1, 16, 17, 36, 37])
    shape = dict(n_batch=2, s=37, width=8, row_len=row_len)
    check(has_bias, add_base, dtype, threads, n_heads, kernel_size, level, monkeypatch, **shape)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("has_bias,add_base", [(True, True), (False, False)])
def test_rows_of_several_key_tiles_equal_the_reference(has_bias, add_base, dtype, level, monkeypatch):
    """The pointwise kernel works through a row in tiles of 16 vectors (64 to 256 keys): rows that
    end before, at and after a tile's edge, and rows of several tiles."""
    row_len = torch.tensor([1, 129, 256, 257, 300])
    shape = dict(n_batch=2, s=300, width=8, row_len=row_len)
    check(has_bias, add_base, dtype, 1, 4, 1, level, monkeypatch, **shape)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_the_backward_is_the_same_to_the_bit_at_any_thread_count(kernel_size):
    # Threads split the rows and sum their weight gradients in double before the cast to float, so
    # a run's DAPE gradients do not depend on torch's thread count (the DAPE pages' thread noise
    # comes from elsewhere: docs/results/dape_extrapolation/notes.md).
    gen = torch.Generator().manual_seed(0)
    n_batch, n_heads, t, width = 16, 4, 128, 32
    taps = (3,) if kernel_size == 3 else ()
    scores, bias = (
        torch.randn(n_batch, n_heads, t, t, generator=gen),
        torch.randn(n_heads, t, t, generator=gen),
    )
    w1, w2 = (
        torch.randn(width, 2 * n_heads, *taps, generator=gen),
        torch.randn(n_heads, width, *taps, generator=gen),
    )
    b1, row_len = torch.randn(width, generator=gen), torch.arange(1, t + 1)
    grad = torch.randn(n_batch, n_heads, t, t, generator=gen)
    assert scores.numel() >= native.MIN_PARALLEL_WORK  # the kernel does use the threads
    outputs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            g, g_bias = grad.clone(), torch.zeros(n_heads, t, t)
            weights = native.dape_mlp_backward_(scores, bias, w1, b1, w2, row_len, g, g_bias, slope=0.01)
            outputs.append((*weights, g, g_bias))
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_v2_register_blocks_and_their_leftovers_equal_the_reference(dtype, level, monkeypatch):
    """V2 works in blocks of 4 channels x 2 vectors of keys (2 x 2 rows for the weight gradients) and
    reads up to a block past each row's length: a width and head count that leave single channels
    over, lengths around block edges (16 and 32 keys with 8 or 16 lanes), and a long row before
    short ones in the same row buffers."""
    row_len = torch.tensor([70, 1, 15, 16, 33, 0, 32, 65])
    shape = dict(n_batch=2, s=70, width=7, row_len=row_len)
    check(True, True, dtype, 1, 3, 3, level, monkeypatch, **shape)


def check(
    has_bias,
    add_base,
    dtype,
    threads,
    n_heads,
    kernel_size,
    level,
    monkeypatch,
    *,
    n_batch,
    s,
    width,
    row_len,
):
    """The kernel's logits and gradients against ``reference`` on random float64 inputs."""
    monkeypatch.setenv("POSLAB_NATIVE_ARCH", level)
    monkeypatch.setattr(native, "MIN_PARALLEL_WORK", 0 if threads > 1 else 2**62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert native.build_info(n_heads).startswith(level)
    gen = torch.Generator().manual_seed(0)
    t = row_len.shape[0]
    channels = 2 * n_heads if has_bias else n_heads

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    taps = (3,) if kernel_size == 3 else ()
    scores, w1, b1, w2, b2 = (
        rand(n_batch, n_heads, t, s),
        rand(width, channels, *taps),
        rand(width),
        rand(n_heads, width, *taps),
        rand(n_heads),
    )
    bias = rand(n_heads, t, s) if has_bias else None
    ref, keep = reference(scores, bias, w1, b1, w2, b2, row_len, add_base)
    grad_logits = torch.randn(ref.shape, generator=gen, dtype=torch.float64) * keep
    ref.masked_fill(~keep, 0).backward(grad_logits)

    def cast(x):
        return None if x is None else x.detach().to(dtype)

    out = native.dape_mlp_forward(
        *(cast(x) for x in (scores, bias, w1, b1, w2, b2)), row_len, slope=0.01, add_base=add_base
    )
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    assert torch.isneginf(out[~keep.expand_as(out)]).all()
    torch.testing.assert_close(out[keep.expand_as(out)].double(), ref[keep.expand_as(ref)], **tol)

    grad = cast(grad_logits).clone()
    grad_bias = torch.zeros(n_heads, t, s, dtype=dtype) if has_bias else None
    grad_w1, grad_b1, grad_w2 = native.dape_mlp_backward_(
        *(cast(x) for x in (scores, bias, w1, b1, w2)), row_len, grad, grad_bias, slope=0.01
    )
    torch.testing.assert_close(grad.double(), scores.grad, **tol)
    for got, want in ((grad_w1, w1.grad), (grad_b1, b1.grad), (grad_w2, w2.grad)):
        torch.testing.assert_close(got.double(), want, **tol)
    if has_bias:
        base_term = grad_logits.sum(0) if add_base else 0
        torch.testing.assert_close(grad_bias.double() + base_term, bias.grad, **tol)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("has_bias,add_base", [(True, True), (True, False), (False, False)])
def test_the_attention_backward_done_in_the_kernel_equals_the_reference(
    has_bias, add_base, dtype, threads, level, monkeypatch
):
    """With probs and row the kernel also does the softmax's backward (grad holds grad_out v^T on
    entry), the scale, dL/db2 and the base's own term of dL/dB: against autograd through the reference
    MLP, a softmax and the value product in float64."""
    monkeypatch.setenv("POSLAB_NATIVE_ARCH", level)
    monkeypatch.setattr(native, "MIN_PARALLEL_WORK", 0 if threads > 1 else 2**62)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(0)
    n_batch, n_heads, s, width, scale = 2, 4, 300, 8, 0.25
    row_len = torch.tensor([1, 17, 256, 257, 300])  # within a vector, at and past a tile's edge
    t = row_len.shape[0]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    scores, w1, b1, w2, b2 = (
        rand(n_batch, n_heads, t, s),
        rand(width, 2 * n_heads if has_bias else n_heads),
        rand(width),
        rand(n_heads, width),
        rand(n_heads),
    )
    bias = rand(n_heads, t, s) if has_bias else None
    v = rand(n_batch, n_heads, s, 6)
    grad_out = torch.randn(n_batch, n_heads, t, 6, generator=gen, dtype=torch.float64)
    logits, _ = reference(scores, bias, w1, b1, w2, b2, row_len, add_base)
    probs = torch.softmax(logits, -1)
    out = probs @ v
    (out * grad_out).sum().backward()

    def cast(x):
        return None if x is None else x.detach().to(dtype).contiguous()

    grad = cast(grad_out @ v.transpose(-1, -2))
    grad_bias = torch.zeros(n_heads, t, s, dtype=dtype) if has_bias else None
    grad_b2 = torch.empty(n_heads, dtype=dtype)
    grad_w1, grad_b1, grad_w2 = native.dape_mlp_backward_(
        *(cast(x) for x in (scores, bias, w1, b1, w2)), row_len, grad, grad_bias, slope=0.01,
        probs=cast(probs), row=cast((grad_out * out).sum(-1)), scale=scale, base_grad=add_base and has_bias,
        grad_b2=grad_b2,
    )  # fmt: skip
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(grad.double(), scale * scores.grad, **tol)  # zero past each row's keys
    for got, want in ((grad_w1, w1.grad), (grad_b1, b1.grad), (grad_w2, w2.grad), (grad_b2, b2.grad)):
        torch.testing.assert_close(got.double(), want, **tol)
    if has_bias:
        torch.testing.assert_close(grad_bias.double(), bias.grad, **tol)


def test_switched_off_by_the_environment(monkeypatch):
    native._library.cache_clear()  # a first call while switched off must not stick
    monkeypatch.setenv("POSLAB_NATIVE", "0")
    assert not native.available()
    assert not native.supports(torch.zeros(1), n_heads=4)
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    assert native.supports(torch.zeros(1), n_heads=4)
    assert not native.supports(torch.zeros(1, dtype=torch.bfloat16), n_heads=4)  # float32 and float64 only
    assert not native.supports(torch.zeros(1), n_heads=native.MAX_HEADS + 1)


def test_build_is_cached_and_a_failed_build_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available()
        built = list(tmp_path.glob("dape_mlp-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available() and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt

        broken = tmp_path / "broken.cpp"
        broken.write_text("this is not C++\n")
        monkeypatch.setattr(native, "SOURCE", broken)
        native._library.cache_clear()
        with pytest.warns(UserWarning, match="building the native DAPE kernel failed"):
            assert not native.available()
        record = built[0].with_suffix(".sha256")  # the library's size and checksum
        assert sorted(tmp_path.iterdir()) == sorted([*built, record, broken])  # no half-written library left
        # DAPE still runs, on its PyTorch path.
        enc = poslab.build_encoding("dape", n_heads=2, head_dim=8)
        q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
        assert torch.isfinite(poslab.attend(q, k, v, enc)).all()
    finally:
        native._library.cache_clear()


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    """The kernel reads raw pointers; every shape, dtype and layout it assumes is checked first."""
    scores, bias = torch.randn(1, 2, 3, 5), torch.randn(2, 3, 5)
    w1, b1, w2, b2, row_len = (
        torch.randn(4, 4),
        torch.randn(4),
        torch.randn(2, 4),
        torch.randn(2),
        torch.full((3,), 5),
    )

    def forward(**change):
        args = {**dict(scores=scores, bias=bias, w1=w1, b1=b1, w2=w2, b2=b2, row_len=row_len), **change}
        return native.dape_mlp_forward(**args, slope=0.01, add_base=True)

    assert forward().shape == scores.shape
    for change, message in (
        ({"w1": torch.randn(4, 2)}, r"w1 must be \(4, 4\)"),  # bias given: 2H input channels
        ({"bias": torch.randn(2, 3, 4)}, r"bias must be \(2, 3, 5\)"),
        ({"scores": torch.randn(1, 2, 5, 3).transpose(-1, -2)}, "contiguous"),
        ({"b2": torch.randn(2, dtype=torch.float64)}, "contiguous CPU tensor of torch.float32"),
        ({"row_len": torch.full((2,), 5)}, r"row_len must be a CPU int64 tensor of shape \(3,\)"),
        ({"scores": torch.randn(2, 3, 5)}, r"scores must be \(B, H, t, S\)"),
    ):
        with pytest.raises(ValueError, match=message):
            forward(**change)
    grad = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"grad must be \(1, 2, 3, 5\)"):
        native.dape_mlp_backward_(scores, bias, w1, b1, w2, row_len, grad, None, slope=0.01)
    grad = torch.randn(1, 2, 3, 5)
    for change, message in (
        ({"probs": torch.rand(1, 2, 3, 5)}, "probs and row come together"),
        ({"probs": torch.rand(1, 2, 3, 4), "row": torch.randn(1, 2, 3)}, r"probs must be \(1, 2, 3, 5\)"),
        ({"row": torch.randn(1, 2, 3, 1), "probs": torch.rand(1, 2, 3, 5)}, r"row must be \(1, 2, 3\)"),
        ({"grad_b2": torch.empty(3)}, r"grad_b2 must be \(2,\)"),
        ({"base_grad": True}, "base_grad adds to grad_bias, which is None"),
    ):
        with pytest.raises(ValueError, match=message):
            native.dape_mlp_backward_(scores, bias, w1, b1, w2, row_len, grad, None, slope=0.01, **change)
    with pytest.raises(ValueError, match="for kernel_size 1"):  # V2 takes none of the extras
        v2 = (torch.randn(4, 4, 3), b1, torch.randn(2, 4, 3))
        native.dape_mlp_backward_(scores, bias, *v2, row_len, grad, None, slope=0.01, scale=0.5)
    # a row that sees no key is all -inf, not an out-of-bounds write
    out = forward(row_len=torch.tensor([0, -3, 5]))
    assert torch.isneginf(out[:, :, :2]).all() and torch.isfinite(out[:, :, 2]).all()


def test_the_target_level_is_checked_and_named():
    """POSLAB_NATIVE_ARCH forces a build; a level the CPU cannot run is refused, not a crash later."""
    assert native.arch() in (*native.LEVELS, "native")
    assert native.cpu_model()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSLAB_NATIVE_ARCH", "pentium")
        with pytest.raises(ValueError, match="POSLAB_NATIVE_ARCH must be native or one of"):
            native.arch()
        missing = [level for level in native.LEVELS if level not in native.supported_levels()]
        if missing:
            mp.setenv("POSLAB_NATIVE_ARCH", missing[0])
            with pytest.raises(ValueError, match="cannot run it"):
                native.arch()


def test_the_guard_times_once_caches_beside_the_library_and_is_honoured(tmp_path, monkeypatch):
    """By default DAPE takes the kernel only where a one-off timing found it faster; the timing is
    kept beside the library (a later process reads it instead of timing again); POSLAB_NATIVE=1 and
    =0 override it."""
    from poslab.kernels import dape

    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("POSLAB_NATIVE", raising=False)
    monkeypatch.setattr(native, "_decisions", {})
    native._library.cache_clear()
    try:
        enc = poslab.build_encoding("dape", n_heads=4, head_dim=8)
        q = torch.randn(1, 4, 6, 8)
        calls = []

        def slower(n_heads, width, dtype, taps):
            calls.append((n_heads, width, dtype, taps))
            return {"native": 2.0, "torch": 1.0}

        monkeypatch.setattr(dape, "time_both_paths", slower)
        assert not enc.runs_natively(q) and not enc.runs_natively(q)
        assert calls == [(4, 32, torch.float32, 1)]  # timed once per process
        (guard,) = tmp_path.glob("*.guard.json")
        assert (tmp_path / guard.name.replace(".guard.json", ".so")).exists()
        cached = json.loads(guard.read_text())
        assert cached == {"dape-k1-h4-d32-float32": {"native": 2.0, "torch": 1.0, "native_wins": False}}

        monkeypatch.setattr(native, "_decisions", {})  # a new process: reads the file, times nothing
        monkeypatch.setattr(dape, "time_both_paths", lambda *a: pytest.fail("timed again"))
        cached["dape-k1-h4-d32-float32"]["native_wins"] = True
        guard.write_text(json.dumps(cached))
        assert enc.runs_natively(q)
        monkeypatch.setenv("POSLAB_NATIVE", "0")
        assert not enc.runs_natively(q)
        monkeypatch.setattr(native, "_decisions", {})
        cached["dape-k1-h4-d32-float32"]["native_wins"] = False
        guard.write_text(json.dumps(cached))
        monkeypatch.setenv("POSLAB_NATIVE", "1")
        assert enc.runs_natively(q)
    finally:
        native._library.cache_clear()


def test_the_guard_timing_measures_both_paths():
    from poslab.kernels import dape

    timing = dape.time_both_paths(2, 8, torch.float32, rounds=1)
    assert set(timing) == {"native", "torch"} and all(0 < x < 10 for x in timing.values())


@pytest.mark.parametrize("level", ["x86-64-v3", "x86-64-v4"])
def test_every_x86_level_compiles_even_where_it_cannot_run(level, tmp_path, monkeypatch):
    """CI may lack AVX-512: the v4 build (16-float vectors) must at least compile everywhere, and its
    library is named by level and head count (one per instruction set, cached side by side)."""
    if not native.supported_levels():
        pytest.skip("not an x86-64 CPU")
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
    path = native._build(native._compiler(), 4, level)
    assert path.exists() and path.name.startswith(f"dape_mlp-h4-{level}-")
    cope = native._build_cope(native._compiler(), level)  # both include the shared simd.h
    assert cope.exists() and cope.name.startswith(f"cope_rows-{level}-")


def test_a_change_to_the_shared_header_rebuilds_both_kernels(tmp_path, monkeypatch):
    """simd.h is part of every library's cache key: editing it must not reuse a stale build."""
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path / "cache"))
    level = native.arch()
    before = native._build(native._compiler(), 2, level), native._build_cope(native._compiler(), level)
    (header,) = native.HEADERS
    edited = tmp_path / "simd.h"
    edited.write_text(header.read_text() + "// edited\n")
    monkeypatch.setattr(native, "HEADERS", (edited,))
    after = native._build(native._compiler(), 2, level), native._build_cope(native._compiler(), level)
    assert all(b.exists() and a.exists() and a != b for a, b in zip(after, before, strict=True))


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """A cache the tests copy libraries from, each built once (not loaded: a library loaded in this
    process and then cut short would take the test process down)."""
    return tmp_path_factory.mktemp("native-cache")


@pytest.fixture
def built_cache(tmp_path, monkeypatch, libraries):
    """``built_cache(n_heads)``: POSLAB_CACHE is ``tmp_path``, holding the DAPE library for
    ``n_heads`` heads and its record; returns the library's path."""
    import shutil

    monkeypatch.setenv("POSLAB_NATIVE", "1")
    native._library.cache_clear()

    def make(n_heads: int = 2):
        monkeypatch.setenv("POSLAB_CACHE", str(libraries))
        library = native._build(native._compiler(), n_heads, native.arch())
        monkeypatch.setenv("POSLAB_CACHE", str(tmp_path))
        for path in (library, library.with_suffix(".sha256")):
            shutil.copy(path, tmp_path / path.name)
        return tmp_path / library.name

    yield make
    native._library.cache_clear()


def dape_runs(n_heads: int) -> bool:
    enc = poslab.build_encoding("dape", n_heads=n_heads, head_dim=8)
    q, k, v = (torch.randn(1, n_heads, 6, 8) for _ in range(3))
    return bool(torch.isfinite(poslab.attend(q, k, v, enc)).all())


@pytest.mark.parametrize("record", [True, False])
def test_a_truncated_cached_library_is_rebuilt_not_loaded(built_cache, record):
    """Loading a truncated .so killed the process with "Bus error" (SIGBUS): it is checked against
    the size and checksum recorded at build time, or without a record loaded in a subprocess first."""
    # n_heads=3: a head count no other test of this process loads (a library loaded once stays
    # mapped under its name, whatever happens to the file)
    library = built_cache(3)
    good = library.read_bytes()
    library.write_bytes(good[: len(good) // 2])
    if not record:
        library.with_suffix(".sha256").unlink()
    try:
        assert native.library(3) is not None
        assert library.read_bytes() == good  # built again
    finally:
        native._library.cache_clear()


def test_a_truncated_library_in_a_cache_that_cannot_replace_it_falls_back_with_one_warning(
    built_cache, monkeypatch
):
    library = built_cache(5)
    library.write_bytes(library.read_bytes()[:4096])

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(native, "_remove", read_only)
    try:
        with pytest.warns(UserWarning, match="damaged") as caught:
            assert native.library(5) is None
            assert dape_runs(5)  # on the PyTorch path
        assert len(caught) == 1
    finally:
        native._library.cache_clear()


def test_a_read_only_cache_without_a_guard_file_times_for_this_process_only(
    tmp_path, monkeypatch, built_cache
):
    built_cache(2)
    monkeypatch.setenv("POSLAB_NATIVE", "auto")
    monkeypatch.setattr(native, "_decisions", {})

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(native.tempfile, "mkstemp", read_only)
    try:
        with pytest.warns(UserWarning, match="cannot write the native kernels' timing"):
            native.decision("k", 2, lambda: {"native": 1.0, "torch": 2.0})
        assert native.decision("k", 2, lambda: pytest.fail("timed again"))
        assert not list(tmp_path.glob("*.guard.json"))
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize(
    "content",
    ["[]", '"x"', '{"k": "fast"}', '{"k": {"native": 1.0, "torch": 2.0}}', '{"k": {"native_wins": "yes"}}'],
)
def test_a_guard_file_of_the_wrong_shape_is_treated_as_absent(monkeypatch, built_cache, content):
    library = built_cache(2)
    monkeypatch.setattr(native, "_decisions", {})
    monkeypatch.setattr(native, "_warned", set())
    library.with_suffix(".guard.json").write_text(content)
    try:
        with pytest.warns(UserWarning, match="measuring"):
            assert native.decision("k", 2, lambda: {"native": 1.0, "torch": 2.0})
        assert json.loads(library.with_suffix(".guard.json").read_text())["k"]["native_wins"] is True
    finally:
        native._library.cache_clear()


def test_a_garbage_poslab_native_warns_naming_the_valid_values(monkeypatch):
    monkeypatch.setenv("POSLAB_NATIVE", "garbage")
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(UserWarning, match="POSLAB_NATIVE='garbage' is not one of auto, 1, .*0"):
        assert native.mode() == "auto"


def test_a_build_uses_the_sources_as_imported_not_as_changed_on_disk_since(tmp_path, monkeypatch):
    """A long run compiles kernels lazily: a `git pull` meanwhile must not give it a library built
    from C++ that no longer matches the Python calling it (it segfaulted)."""
    monkeypatch.setenv("POSLAB_CACHE", str(tmp_path / "cache"))
    source, (header,) = tmp_path / native.SOURCE.name, native.HEADERS
    source.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", source)
    monkeypatch.setattr(native, "_SOURCES", native._snapshot((source, header)))  # as at import
    level = native.arch()
    before = native._build(native._compiler(), 2, level)
    source.write_text("this is not C++ any more\n")  # the file on disk changes under the run
    (before.parent / before.name).unlink()  # ... and the library must be built again
    after = native._build(native._compiler(), 2, level)
    assert after == before and after.exists()  # the same snapshot, the same key, compiled fine
    monkeypatch.setattr(native, "_SOURCES", {})  # a file never snapshot is read from disk
    with pytest.raises(RuntimeError):
        native._build(native._compiler(), 2, level)
