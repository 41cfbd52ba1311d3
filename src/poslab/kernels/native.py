"""Optional native (C++) CPU kernels, compiled on first use and loaded with ctypes.

The DAPE MLP over a (B, H, t, S) score map is small per entry (2H -> D -> H channels) but applied to
B x t x S entries; in PyTorch it becomes a handful of skinny matrix products and elementwise passes
over a (B x t x S, D) hidden map, which is memory-bound. ``dape_mlp.cpp`` keeps the hidden map in
registers instead. It is plain C++ (no PyTorch headers), built with the system compiler into
``$POSLAB_CACHE`` (default ``~/.cache/poslab``), keyed by a hash of the source, the shared header
``simd.h`` (the instruction-set preamble both sources include), the compiler and the flags. A
library is built per head count (a compile-time constant: the channel loops unroll into registers)
and per x86-64 level (``-march=x86-64-v3``: AVX2 and FMA, 8-float vectors;
``x86-64-v4``: AVX-512, 16-float vectors), the highest this CPU runs, so the code does not depend on
the machine it was first built on; ``POSLAB_NATIVE_ARCH`` picks another level (or ``native``).

``cope_rows.cpp`` does CoPE's per-row elementwise work (gates, positions, interpolation, softmax and
their gradients; ``poslab.kernels.cope``). It has no compile-time constants: one library per
x86-64 level, built, named and cached by the same rules.

``POSLAB_NATIVE``: ``auto`` (default) uses a kernel where a one-off timing against the PyTorch
path, cached beside the library, found it faster (``poslab.kernels.dape``, ``poslab.kernels.cope``);
``1`` always; ``0`` never. Nothing depends on it: when there is no compiler, the build fails, or the
tensors are not float32/float64 CPU tensors, DAPE and CoPE use their PyTorch paths (same results up
to rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("poslab")

SOURCE = Path(__file__).with_name("dape_mlp.cpp")
COPE_SOURCE = Path(__file__).with_name("cope_rows.cpp")
HEADERS = (Path(__file__).with_name("simd.h"),)  # included by both sources: part of every cache key


def _snapshot(paths: tuple[Path, ...]) -> dict[Path, bytes]:
    """The bytes of each readable file of ``paths``."""
    taken = {}
    for path in paths:
        with suppress(OSError):  # an install without the sources: the PyTorch paths run (`available`)
            taken[path] = path.read_bytes()
    return taken


# The C++ sources as they were when this module was imported. Kernels compile lazily (a head count,
# a dtype or an instruction set first used hours into a run), and a build must match the Python that
# calls it: after a `git pull` under a running job, building from the files on disk gave a library
# with another calling convention, and the job died of a segmentation fault.
_SOURCES = _snapshot((SOURCE, COPE_SOURCE, *HEADERS))


def _source_bytes(path: Path) -> bytes:
    """``path``'s bytes as imported (`_SOURCES`), or as on disk for a file not snapshot."""
    return _SOURCES[path] if path in _SOURCES else path.read_bytes()


# -ffp-contract=fast: a * b + c as one fused multiply-add (ISO C++ mode turns contraction off).
FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")

# x86-64 micro-architecture levels, highest first, with the CPU flags each needs (beyond the lower
# level's; /proc/cpuinfo names). The kernel's vector width follows the level: 32 bytes on v3, 64 on v4.
LEVELS = {
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "x86-64-v3": ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"),
    "x86-64-v2": ("sse4_1", "sse4_2", "ssse3", "popcnt", "cx16"),
}


_switched_off = 0  # depth of ``switched_off()`` blocks
_forced = 0  # depth of ``forced()`` blocks


def mode() -> str:
    """'off', 'on' (always, where built) or 'auto' (where the cached timing found it faster)."""
    if _switched_off:
        return "off"
    if _forced:
        return "on"
    value = os.environ.get("POSLAB_NATIVE", "auto").strip().lower()
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    if value not in ("auto", ""):
        _warn_once(
            f"poslab: POSLAB_NATIVE={value!r} is not one of auto, {', '.join(_ON)}, {', '.join(_OFF)}; "
            "using auto"
        )
    return "auto"


_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", "force")


def enabled() -> bool:
    """False when the environment (POSLAB_NATIVE=0) or a ``switched_off()`` block turns them off."""
    return mode() != "off"


@contextmanager
def switched_off() -> Iterator[None]:
    """Within the block, kernels take their PyTorch path (e.g. to benchmark both side by side)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


@contextmanager
def forced() -> Iterator[None]:
    """Within the block, kernels are used wherever they are built, whatever the guard's timing said."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


def cache_dir() -> Path:
    return Path(os.environ.get("POSLAB_CACHE") or Path.home() / ".cache" / "poslab")


@cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once per process: every kernel call asks for the target level
    (``arch``), and reading /proc/cpuinfo took about 0.2 ms, a tenth of a small block's DAPE call."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def supported_levels() -> list[str]:
    """The x86-64 levels this CPU executes, highest first (empty off x86-64)."""
    return list(_levels())


@cache
def _levels() -> tuple[str, ...]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    flags = _cpu_flags()
    names = list(LEVELS)
    return tuple(name for i, name in enumerate(names) if all(set(LEVELS[n]) <= flags for n in names[i:]))


def arch() -> str:
    """The -march the kernel is built for: $POSLAB_NATIVE_ARCH, else the highest level this CPU runs
    (v3 or v4; 'native' off x86-64 or below v3)."""
    chosen = os.environ.get("POSLAB_NATIVE_ARCH", "").strip()
    if chosen:
        if chosen != "native" and chosen not in LEVELS:
            raise ValueError(
                f"POSLAB_NATIVE_ARCH must be native or one of {', '.join(LEVELS)}, got {chosen!r}"
            )
        if chosen != "native" and chosen not in supported_levels():
            raise ValueError(f"POSLAB_NATIVE_ARCH={chosen}: this CPU ({cpu_model()}) cannot run it")
        return chosen
    levels = [level for level in supported_levels() if level in ("x86-64-v4", "x86-64-v3")]
    return levels[0] if levels else "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _flags(n_heads: int, target: str) -> list[str]:
    return [*FLAGS, f"-march={target}", f"-DPOSLAB_HEADS={n_heads}"]


def _build(compiler: str, n_heads: int, target: str) -> Path:
    """Compile SOURCE (the DAPE kernel for ``n_heads`` heads) into the cache."""
    return _compile(compiler, SOURCE, f"dape_mlp-h{n_heads}", _flags(n_heads, target), target)


def _build_cope(compiler: str, target: str) -> Path:
    """Compile COPE_SOURCE (no compile-time constants) into the cache."""
    return _compile(compiler, COPE_SOURCE, "cope_rows", [*FLAGS, f"-march={target}"], target)


def _compile(compiler: str, source_path: Path, stem: str, flags: list[str], target: str) -> Path:
    """Compile a source into the cache (once per source, compiler, flags, and CPU for -march=native)."""
    source, headers = _source_bytes(source_path), {h.name: _source_bytes(h) for h in HEADERS}
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [source, *headers.values(), " ".join(flags).encode(), version.encode()]
    if target == "native":
        parts.append(" ".join(sorted(_cpu_flags())).encode())
    key = hashlib.sha256(b"\0".join(parts))
    target_path = cache_dir() / f"{stem}-{target}-{key.hexdigest()[:16]}.so"
    if target_path.exists():
        if _intact(target_path):
            return target_path
        log.warning("the cached native kernel %s is damaged (truncated?); building it again", target_path)
        try:
            _remove(target_path)
        except OSError as error:
            raise RuntimeError(
                f"the cached {target_path} is damaged and cannot be replaced ({error})"
            ) from None
    target_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling the native kernel %s into %s (once)", source_path.name, target_path)
    # Build beside the target and rename: a concurrent process never sees a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_path.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix="poslab-src-") as sources:  # the snapshot, compiled
            for name, text in {**headers, source_path.name: source}.items():
                Path(sources, name).write_bytes(text)
            result = subprocess.run(
                [compiler, *flags, f"-I{sources}", str(Path(sources, source_path.name)), "-o", tmp],
                capture_output=True,
                text=True,
            )
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or ["failed"]
            raise RuntimeError(errors[0].strip())
        _write_record(Path(tmp), target_path)
        os.replace(tmp, target_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target_path


def _record_path(library: Path) -> Path:
    """Where the size and SHA-256 of a cached library, taken when it was built, are kept."""
    return library.with_suffix(".sha256")


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _write_record(built: Path, library: Path) -> None:
    """Record the size and checksum of ``built`` (about to become ``library``); a cache that cannot
    take the record only costs a test load in a subprocess later (`_intact`)."""
    try:
        record = _record_path(library)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=library.parent)
        with os.fdopen(fd, "w") as f:
            f.write(_fingerprint(built) + "\n")
        os.replace(tmp, record)
    except OSError:
        pass


def _intact(library: Path) -> bool:
    """Whether a cached library is the one that was built: its size and checksum match the record
    taken at build time. Loading a truncated library (a full disk, a copy cut short) does not fail:
    the process dies of SIGBUS ("Bus error") when it touches the missing pages. A library without a
    record (an older poslab, a cache copied without it) is loaded in a subprocess first."""
    try:
        expected = _record_path(library).read_text().strip()
    except OSError:
        expected = ""
    try:
        if expected:
            return _fingerprint(library) == expected
        probe = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
        result = subprocess.run([sys.executable, "-c", probe, str(library)], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    if result.returncode != 0:
        return False
    _write_record(library, library)
    return True


def _remove(path: Path) -> None:
    path.unlink()


MAX_HEADS = 32  # beyond, one library per head count is not worth it: DAPE takes its PyTorch path

_PTR, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


def _load(kernel: str, build: Callable[[str], Path]) -> ctypes.CDLL | None:
    """Build (``build(compiler)``) and load a library, or None with a warning naming ``kernel``."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(f"poslab: no C++ compiler found; {kernel} uses its PyTorch path", stacklevel=4)
        return None
    try:
        return ctypes.CDLL(str(build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        message = f"poslab: building the native {kernel} kernel failed ({error}); using PyTorch"
        warnings.warn(message, stacklevel=4)
        return None


@cache
def _library(n_heads: int, target: str) -> ctypes.CDLL | None:
    """The library for ``n_heads`` heads built for ``target``, or None (with a warning) when it cannot
    be built; built once per process, whatever ``enabled()`` says at the time."""
    lib = _load("DAPE", lambda compiler: _build(compiler, n_heads, target))
    if lib is None:
        return None
    # The signatures of dape_mlp.cpp's entry points: pointers, sizes, the slope, flags, threads.
    forward_args = [_PTR] * 7 + [_I64] * 5 + [_DBL, _INT, _PTR, _INT, _INT]
    # ... then the backward's extras: probs, row, scale, base_grad, grad_b2.
    backward_args = [_PTR] * 6 + [_I64] * 5 + [_DBL] + [_PTR] * 5 + [_INT, _INT, _PTR, _PTR, _DBL, _INT, _PTR]
    for suffix in ("f32", "f64"):
        getattr(lib, f"dape_mlp_forward_{suffix}").argtypes = forward_args
        getattr(lib, f"dape_mlp_backward_{suffix}").argtypes = backward_args
    lib.dape_mlp_isa.restype = ctypes.c_char_p
    return lib


@cache
def _cope_library(target: str) -> ctypes.CDLL | None:
    """cope_rows.cpp built for ``target``, or None (with a warning); once per process."""
    lib = _load("CoPE", lambda compiler: _build_cope(compiler, target))
    if lib is None:
        return None
    # Pointers (scores, z, bias, row_len), sizes (B, H, t, S, P), then as cope_rows.cpp lists them.
    inputs = [_PTR] * 4 + [_I64] * 5
    for suffix in ("f32", "f64"):
        getattr(lib, f"cope_rows_forward_{suffix}").argtypes = [*inputs, _PTR, _PTR, _PTR, _INT]
        getattr(lib, f"cope_rows_backward_{suffix}").argtypes = [*inputs, _PTR, _PTR, _DBL, *[_PTR] * 4, _INT]
        getattr(lib, f"cope_rows_backward_saved_{suffix}").argtypes = [*inputs, _PTR, _DBL, *[_PTR] * 3, _INT]
    lib.cope_rows_isa.restype = ctypes.c_char_p
    return lib


def cope_library() -> ctypes.CDLL | None:
    """The CoPE row kernel for the current target, or None (not built)."""
    return _cope_library(arch())


def library(n_heads: int) -> ctypes.CDLL | None:
    """The library for this head count and the current target, or None (not built, or too many heads)."""
    if not 1 <= n_heads <= MAX_HEADS:
        return None
    return _library(n_heads, arch())


def available(n_heads: int = 4) -> bool:
    """Whether the native kernels are switched on and built for ``n_heads`` (builds on the first call)."""
    return enabled() and built(n_heads)


# torch.compile cannot trace the build or the ctypes load, so it takes whether a library is built
# as a constant (at worst a kernel is built while a function is compiled).
@torch.compiler.assume_constant_result
def built(n_heads: int) -> bool:
    """Whether the DAPE library for ``n_heads`` is built (building it on the first call)."""
    return library(n_heads) is not None


@torch.compiler.assume_constant_result
def cope_built() -> bool:
    """Whether the CoPE row library is built (building it on the first call)."""
    return cope_library() is not None


def build_info(n_heads: int = 4) -> str:
    """What the kernel was built for, e.g. 'x86-64-v3 (avx2, 32-byte vectors)', or why it is not."""
    lib = _library(n_heads, arch()) if _compiler() is not None else None
    if lib is None:
        return "not built"
    return f"{arch()} ({lib.dape_mlp_isa().decode()}, {lib.dape_mlp_vector_bytes()}-byte vectors)"


def decision(key: str, n_heads: int | None, measure: Callable[[], dict[str, float]]) -> bool:
    """Whether to use the kernel for a workload named ``key``: ``measure()`` times it against the
    PyTorch path once (seconds as {'native': ..., 'torch': ...}); the result is cached in a JSON
    file beside the library (one per build), so later processes reuse it. ``n_heads`` names the
    DAPE library; None the CoPE one."""
    lib = cope_library() if n_heads is None else library(n_heads)
    if lib is None:
        return False
    path = Path(lib._name).with_suffix(".guard.json")
    if (path, key) in _decisions:
        return _decisions[path, key]
    cached = _guard_cache(path)
    if key not in cached:
        timing = measure()
        cached = {**_guard_cache(path), key: {**timing, "native_wins": timing["native"] <= timing["torch"]}}
        try:
            fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(cached, f, indent=1)
            os.replace(tmp, path)
        except OSError as error:  # a read-only cache: the timing holds for this process only
            _warn_once(
                f"poslab: cannot write the native kernels' timing to {path} ({error}); "
                "it holds for this process only"
            )
        log.info("native kernel for %s: %s", key, cached[key])
    _decisions[path, key] = bool(cached[key]["native_wins"])
    return _decisions[path, key]


def best_times(runs: dict[str, Callable[[], Tensor]], grad: Tensor, rounds: int) -> dict[str, float]:
    """The guard's measurement: the best of ``rounds`` forward + backward times (seconds) of each
    ``runs[name]()`` (returning the output, ``grad`` its gradient), after one warm-up round, the
    candidates interleaved round after round."""
    best = {name: math.inf for name in runs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, fn in runs.items():
            start = time.perf_counter()
            fn().backward(grad)
            if round_ > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


_decisions: dict[tuple[Path, str], bool] = {}  # this process's reads of the guard files


def _guard_cache(path: Path) -> dict:
    """The timings of a guard file, ``{key: {"native": s, "torch": s, "native_wins": bool}}``; a file
    of another shape (``[]``, a string for an entry, an entry without ``native_wins``) is treated as
    absent (its entries measured again), with one warning."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        _warn_once(f"poslab: {path} is not a JSON object of timings; measuring again")
        return {}
    good = {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("native_wins"), bool)}
    if len(good) < len(data):
        _warn_once(f"poslab: {path} holds entries without a native_wins flag; measuring them again")
    return good


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def supports(*tensors: Tensor | None, n_heads: int) -> bool:
    """Whether the native kernels can take these tensors (CPU, float32 or float64, all one dtype) with
    ``n_heads`` heads: switched on and built (at most ``MAX_HEADS``)."""
    return _cpu_floats(tensors) and available(n_heads)


def cope_supports(*tensors: Tensor | None) -> bool:
    """Whether the CoPE row kernel can take these tensors (as ``supports``): switched on and built."""
    return _cpu_floats(tensors) and enabled() and cope_built()


def _cpu_floats(tensors: tuple[Tensor | None, ...]) -> bool:
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return dtype in _SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype for t in present)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Calls with fewer (batch, head, query, key) entries run on one thread (a decoding step, tiny tests).
MIN_PARALLEL_WORK = 2**15


def _threads(work: int) -> int:
    return 1 if work < MIN_PARALLEL_WORK else torch.get_num_threads()


def _taps(w1: Tensor) -> int:
    return w1.shape[2] if w1.dim() == 3 else 1


def _check(scores: Tensor, bias: Tensor | None, w1, b1, w2, b2, row_len, **others: Tensor | None) -> None:
    """ValueError unless the arguments have the shapes, dtype and layout the C++ kernel assumes
    (it reads raw pointers: a wrong shape would read or write out of bounds, not raise)."""
    if scores.dim() != 4:
        raise ValueError(f"native DAPE: scores must be (B, H, t, S), got {tuple(scores.shape)}")
    _, n_heads, t, s = scores.shape
    width = w1.shape[0] if w1.dim() in (2, 3) else -1
    taps = (w1.shape[2],) if w1.dim() == 3 else ()  # V2: (D, C, 3) and (H, D, 3)
    if taps not in ((), (3,)):
        raise ValueError(f"native DAPE: kernel_size 1 or 3, got w1 of shape {tuple(w1.shape)}")
    expected = {
        "bias": (n_heads, t, s),
        "w1": (width, 2 * n_heads if bias is not None else n_heads, *taps),
        "b1": (width,),
        "w2": (n_heads, width, *taps),
        "b2": (n_heads,),
        "grad": tuple(scores.shape),
        "out": tuple(scores.shape),
        "grad_bias": (n_heads, t, s),
        "probs": tuple(scores.shape),
        "row": tuple(scores.shape[:3]),
        "grad_b2": (n_heads,),
    }
    named = {"scores": scores, "bias": bias, "w1": w1, "b1": b1, "w2": w2, "b2": b2, **others}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"native DAPE: {name} must be {expected[name]}, got {tuple(tensor.shape)}")
        if tensor.dtype != scores.dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"native DAPE: {name} must be a contiguous CPU tensor of {scores.dtype}")
    if scores.dtype not in _SUFFIX or not 1 <= n_heads <= MAX_HEADS:
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
    out: Tensor | None = None,
) -> Tensor:
    """Logits (B, H, t, S): scores + [bias] + b2 + w2 leaky(w1 [scores; bias] + b1), -inf past row_len.

    scores (B, H, t, S), bias (H, t, S) or None, w1 (D, 2H) (D, H without bias), row_len (t,) int64;
    all contiguous. With w1 (D, C, 3) and w2 (H, D, 3), DAPE V2: both products are convolutions of
    width 3 along each row's keys, the features and the hidden map zero past row_len. ``out``: where
    to write the logits (else a new tensor).
    """
    _check(scores, bias, w1, b1, w2, b2, row_len, out=out)
    n_batch, n_heads, t, s = scores.shape
    logits = torch.empty_like(scores) if out is None else out
    fn = getattr(library(n_heads), f"dape_mlp_forward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, bias, w1, b1, w2, b2, row_len))
    sizes = (n_batch, n_heads, t, s, w1.shape[0])
    fn(*pointers, *sizes, slope, int(add_base), _ptr(logits), _threads(scores.numel()), _taps(w1))
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
    probs: Tensor | None = None,
    row: Tensor | None = None,
    scale: float = 1.0,
    base_grad: bool = False,
    grad_b2: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """In place: ``grad`` from dL/dlogits to dL/dscores; ``grad_bias`` (H, t, S) += the MLP's dL/dbias.

    Returns (dW1, db1, dW2). Arguments as for ``dape_mlp_forward``; all contiguous. The pointwise MLP
    (not V2) can also take the attention's backward around it in the same pass over the scores:
    with ``probs`` (B, H, t, S) and ``row`` (B, H, t), ``grad`` holds grad_out @ v^T on entry and the
    softmax's dL/dlogits = probs * (grad - row) is formed as it is read (row = rowsum(grad_out * out));
    ``grad`` is then zero past each row's keys. dL/dscores is multiplied by ``scale`` as it is stored;
    ``base_grad`` adds dL/dlogits summed over the batch to ``grad_bias`` (the A + B + f form's own
    term); ``grad_b2`` (H,), when given, is overwritten with dL/db2 (the sum of dL/dlogits).
    """
    _check(
        scores, bias, w1, b1, w2, None, row_len, grad=grad, grad_bias=grad_bias, probs=probs, row=row,
        grad_b2=grad_b2,
    )  # fmt: skip
    extras = probs is not None or row is not None or scale != 1.0 or base_grad or grad_b2 is not None
    if extras and w1.dim() == 3:
        raise ValueError("native DAPE: probs, row, scale, base_grad and grad_b2 are for kernel_size 1")
    if (probs is None) != (row is None):
        raise ValueError("native DAPE: probs and row come together (the softmax's backward needs both)")
    if base_grad and grad_bias is None:
        raise ValueError("native DAPE: base_grad adds to grad_bias, which is None")
    n_batch, n_heads, t, s = scores.shape
    grad_w1, grad_b1, grad_w2 = torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)
    fn = getattr(library(n_heads), f"dape_mlp_backward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, bias, w1, b1, w2, row_len))
    sizes = (n_batch, n_heads, t, s, w1.shape[0])
    outputs = map(_ptr, (grad, grad_bias, grad_w1, grad_b1, grad_w2))
    extra = (_ptr(probs), _ptr(row), scale, int(base_grad), _ptr(grad_b2))
    fn(*pointers, *sizes, slope, *outputs, _threads(scores.numel()), _taps(w1), *extra)
    return grad_w1, grad_b1, grad_w2


def _check_cope(
    scores: Tensor, z: Tensor, bias: Tensor | None, row_len: Tensor, **others: Tensor | None
) -> None:
    """ValueError unless the arguments have the shapes, dtype and layout cope_rows.cpp assumes."""
    if scores.dim() != 4 or z.dim() != 4 or z.shape[:3] != scores.shape[:3]:
        raise ValueError(
            f"native CoPE: scores (B, H, t, S), z (B, H, t, P), got {tuple(scores.shape)}, {tuple(z.shape)}"
        )
    n_batch, n_heads, t, s = scores.shape
    expected = {
        "bias": (n_heads, t, s),
        "probs": tuple(scores.shape),
        "gates": tuple(scores.shape),
        "grad": tuple(scores.shape),
        "lse": (n_batch, n_heads, t),
        "rowdot": (n_batch, n_heads, t),
        "grad_z": tuple(z.shape),
        "grad_bias": (n_heads, t, s),
    }
    for name, tensor in {"scores": scores, "z": z, "bias": bias, **others}.items():
        if tensor is None:
            continue
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"native CoPE: {name} must be {expected[name]}, got {tuple(tensor.shape)}")
        if tensor.dtype != scores.dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"native CoPE: {name} must be a contiguous CPU tensor of {scores.dtype}")
    if scores.dtype not in _SUFFIX:
        raise ValueError(f"native CoPE: float32 or float64, got {scores.dtype}")
    if row_len.shape != (t,) or row_len.dtype != torch.int64 or row_len.device.type != "cpu":
        raise ValueError(f"native CoPE: row_len must be a CPU int64 tensor of shape ({t},)")
    if not row_len.is_contiguous() or (t > 0 and int(row_len.max()) > s):
        raise ValueError(f"native CoPE: row_len must be contiguous, at most {s}")


def cope_rows_forward(
    scores: Tensor,
    z: Tensor,
    bias: Tensor | None,
    row_len: Tensor,
    *,
    probs: Tensor,
    lse: Tensor,
    gates: Tensor | None = None,
) -> None:
    """CoPE's softmax probabilities into ``probs`` (B, H, t, S; may be ``scores`` itself, zero past
    row_len), the row log-sum-exp into ``lse`` (B, H, t) and, unless None, the gates into ``gates``
    (B, H, t, S, zero past row_len), from scores A = q k^T / sqrt(Dh) (B, H, t, S),
    z = q e^T / sqrt(Dh) (B, H, t, P), bias (H, t, S) or None and row_len (t,) int64; all contiguous."""
    _check_cope(scores, z, bias, row_len, probs=probs, lse=lse, gates=gates)
    fn = getattr(cope_library(), f"cope_rows_forward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, z, bias, row_len))
    outputs = map(_ptr, (probs, lse, gates))
    fn(*pointers, *scores.shape, z.shape[-1], *outputs, _threads(scores.numel()))


def cope_rows_backward_(
    scores: Tensor,
    z: Tensor,
    bias: Tensor | None,
    row_len: Tensor,
    lse: Tensor,
    rowdot: Tensor,
    *,
    scale: float,
    probs: Tensor,
    grad: Tensor,
    grad_z: Tensor,
    grad_bias: Tensor | None,
) -> None:
    """In place: ``grad`` from dP = dO v^T to dL/dA * ``scale``; ``probs`` the recomputed
    probabilities (may be ``scores``); ``grad_z`` (B, H, t, P) = dL/dz; ``grad_bias`` (H, t, S)
    += dL/dlogits summed over the batch. ``rowdot`` (B, H, t) = sum(dO * out); the rest as for
    ``cope_rows_forward``."""
    _check_cope(
        scores,
        z,
        bias,
        row_len,
        lse=lse,
        rowdot=rowdot,
        probs=probs,
        grad=grad,
        grad_z=grad_z,
        grad_bias=grad_bias,
    )
    fn = getattr(cope_library(), f"cope_rows_backward_{_SUFFIX[scores.dtype]}")
    pointers = map(_ptr, (scores, z, bias, row_len))
    outputs = map(_ptr, (probs, grad, grad_z, grad_bias))
    fn(
        *pointers,
        *scores.shape,
        z.shape[-1],
        _ptr(lse),
        _ptr(rowdot),
        scale,
        *outputs,
        _threads(scores.numel()),
    )


def cope_rows_backward_saved_(
    probs: Tensor,
    gates: Tensor,
    z: Tensor,
    row_len: Tensor,
    rowdot: Tensor,
    *,
    scale: float,
    grad: Tensor,
    grad_z: Tensor,
    grad_bias: Tensor | None,
) -> None:
    """``cope_rows_backward_`` from the probabilities and gates the forward kept (``cope_rows_forward``
    with ``gates``) instead of the scores: nothing of the logits is recomputed but the positions."""
    others = dict(gates=gates, rowdot=rowdot, grad=grad, grad_z=grad_z, grad_bias=grad_bias)
    _check_cope(probs, z, None, row_len, **others)
    fn = getattr(cope_library(), f"cope_rows_backward_saved_{_SUFFIX[probs.dtype]}")
    pointers = map(_ptr, (probs, gates, z, row_len))
    outputs = map(_ptr, (grad, grad_z, grad_bias))
    fn(*pointers, *probs.shape, z.shape[-1], _ptr(rowdot), scale, *outputs, _threads(probs.numel()))
