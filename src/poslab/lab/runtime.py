"""Process-level settings for poslab's own command line (never applied on import of the library)."""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every large tensor.

    By default glibc serves allocations above a threshold (at most 32 MiB) with fresh mmap pages and
    unmaps them on free, so every new (B, H, T, S) tensor pays page faults: on a 2-core CPU this made
    an elementwise op on a 33 MB tensor 3-7x slower than the arithmetic alone. Raising the mmap and
    trim thresholds reuses the pages. Returns True if applied; set POSLAB_NO_MALLOC_TUNING=1 to skip.
    Only the ``poslab`` command calls this: importing the library changes nothing process-wide.
    (``poslab bench`` with POSLAB_NO_MALLOC_TUNING=1 therefore times what a library user gets.)
    """
    global _tuned
    if os.environ.get("POSLAB_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 2**30) == 1
    _tuned = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _tuned


def allocator_tuned() -> bool:
    """Whether ``tune_allocator`` has been applied in this process."""
    return _tuned
