"""Optional native (C++) CPU kernels, compiled on first use and loaded with ctypes.

The DAPE MLP over a (B, H, t, S) score map is small per entry (2H -> D -> H channels) but applied to
B x t x S entries; in PyTorch it becomes a handful of skinny matrix products and elementwise passes
over a (B x t x S, D) hidden map, which is memory-bound. ``dape_mlp.cpp`` keeps the hidden map in
registers instead. It is plain C++ (no PyTorch headers), so it builds in a second or two with the
system compiler; the library is cached under ``$POSLAB_CACHE`` (default ``~/.cache/poslab``) by a
hash of the source, the compiler and the CPU's flags (the build uses ``-march=native``).

Nothing depends on it: when there is no compiler, the build fails, ``POSLAB_NATIVE=0`` is set, the
tensors are not float32/float64 CPU tensors, or there are more than ``MAX_HEADS`` heads, DAPE uses its
PyTorch path (same results up to rounding; tests run both). ``available()`` says whether it is built.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("poslab")

SOURCE = Path(__file__).with_name("dape_mlp.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


_switched_off = 0  # depth of ``switched_off()`` blocks


def enabled() -> bool:
    """False when the environment (POSLAB_NATIVE=0) or a ``switched_off()`` block turns them off."""
    if _switched_off:
        return False
    return os.environ.get("POSLAB_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def switched_off() -> Iterator[None]:
    """Within the block, kernels take their PyTorch path (e.g. to benchmark both side by side)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def cache_dir() -> Path:
    return Path(os.environ.get("POSLAB_CACHE") or Path.home() / ".cache" / "poslab")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """Compile SOURCE into the cache (once per source, compiler and CPU); return the library's path."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    target = cache_dir() / f"dape_mlp-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling the native DAPE kernel into %s (once)", target)
    # Build beside the target and rename: a concurrent process never sees a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


MAX_HEADS = 32  # the C++ kernel's stack arrays (MAX_HEADS in dape_mlp.cpp)

_PTR, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


@cache
def _library() -> ctypes.CDLL | None:
    """The built library, or None (with a warning) when it cannot be built; built once per process,
    whatever ``enabled()`` says at the time (the switch is read at every call, not cached here)."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("poslab: no C++ compiler found; DAPE uses its PyTorch path", stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        message = f"poslab: building the native DAPE kernel failed ({error}); using PyTorch"
        warnings.warn(message, stacklevel=3)
        return None
    # The signatures of dape_mlp.cpp's entry points: pointers, sizes, the slope, flags, threads.
    forward_args = [_PTR] * 7 + [_I64] * 5 + [_DBL, _INT, _PTR, _INT]
    backward_args = [_PTR] * 6 + [_I64] * 5 + [_DBL] + [_PTR] * 5 + [_INT]
    for suffix in ("f32", "f64"):
        getattr(lib, f"dape_mlp_forward_{suffix}").argtypes = forward_args
        getattr(lib, f"dape_mlp_backward_{suffix}").argtypes = backward_args
    return lib


def available() -> bool:
    """Whether the native kernels are switched on and built (builds them on the first such call)."""
    return enabled() and _library() is not None


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def supports(*tensors: Tensor | None) -> bool:
    """Whether the native kernels can take these tensors: CPU, float32 or float64, all one dtype."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (
        dtype in _SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype for t in present) and available()
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Calls with fewer (batch, head, query, key) entries run on one thread (a decoding step, tiny tests).
MIN_PARALLEL_WORK = 2**15


def _threads(work: int) -> int:
    return 1 if work < MIN_PARALLEL_WORK else torch.get_num_threads()


def _check(scores: Tensor, bias: Tensor | None, w1, b1, w2, b2, row_len, **others: Tensor | None) -> None:
    """ValueError unless the arguments have the shapes, dtype and layout the C++ kernel assumes
    (it reads raw pointers: a wrong shape would read or write out of bounds, not raise)."""
    if scores.dim() != 4:
        raise ValueError(f"native DAPE: scores must be (B, H, t, S), got {tuple(scores.shape)}")
    _, n_heads, t, s = scores.shape
    width = w1.shape[0] if w1.dim() == 2 else -1
    expected = {
        "bias": (n_heads, t, s),
        "w1": (width, 2 * n_heads if bias is not None else n_heads),
        "b1": (width,),
        "w2": (n_heads, width),
        "b2": (n_heads,),
        "grad": tuple(scores.shape),
        "grad_bias": (n_heads, t, s),
    }
    named = {"scores": scores, "bias": bias, "w1": w1, "b1": b1, "w2": w2, "b2": b2, **others}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"native DAPE: {name} must be {expected[name]}, got {tuple(tensor.shape)}")
        if tensor.dtype != scores.dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"native DAPE: {name} must be a contiguous CPU tensor of {scores.dtype}")
    if scores.dtype not in _SUFFIX or n_heads > MAX_HEADS:
        raise ValueError(
            f"native DAPE: float32 or float64 and at most {MAX_HEADS} heads, got {scores.dtype}, {n_heads}"
        )
    if row_len.shape != (t,) or row_len.dtype != torch.int64 or row_len.device.type != "cpu":
        raise ValueError(f"native DAPE: row_len must be a CPU int64 tensor of shape ({t},)")
    if not row_len.is_contiguous():
        raise ValueError("native DAPE: row_len must be contiguous")


def dape_mlp_forward(
    scores: Tensor,
    bias: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    row_len: Tensor,
    *,
    slope: float,
    add_base: bool,
) -> Tensor:
    """Logits (B, H, t, S): scores + [bias] + b2 + w2 leaky(w1 [scores; bias] + b1), -inf past row_len.

    scores (B, H, t, S), bias (H, t, S) or None, w1 (D, 2H) (D, H without bias), row_len (t,) int64;
    all contiguous.
    """
    _check(scores, bias, w1, b1, w2, b2, row_len)
    n_batch, n_heads, t, s = scores.shape
    logits = torch.empty_like(scores)
    fn = getattr(_library(), f"dape_mlp_forward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, bias, w1, b1, w2, b2, row_len))
    sizes = (n_batch, n_heads, t, s, w1.shape[0])
    fn(*pointers, *sizes, slope, int(add_base), _ptr(logits), _threads(scores.numel()))
    return logits


def dape_mlp_backward_(
    scores: Tensor,
    bias: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    row_len: Tensor,
    grad: Tensor,
    grad_bias: Tensor | None,
    *,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """In place: ``grad`` from dL/dlogits to dL/dscores; ``grad_bias`` (H, t, S) += the MLP's dL/dbias.

    Returns (dW1, db1, dW2). Arguments as for ``dape_mlp_forward``; all contiguous.
    """
    _check(scores, bias, w1, b1, w2, None, row_len, grad=grad, grad_bias=grad_bias)
    n_batch, n_heads, t, s = scores.shape
    grad_w1, grad_b1, grad_w2 = torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)
    fn = getattr(_library(), f"dape_mlp_backward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, bias, w1, b1, w2, row_len))
    sizes = (n_batch, n_heads, t, s, w1.shape[0])
    outputs = map(_ptr, (grad, grad_bias, grad_w1, grad_b1, grad_w2))
    fn(*pointers, *sizes, slope, *outputs, _threads(scores.numel()))
    return grad_w1, grad_b1, grad_w2
