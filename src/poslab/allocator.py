"""glibc's allocator settings for large tensors: one process-wide call, never applied on import.

A library user who trains on CPU calls ``poslab.tune_allocator()`` once at the start of the process
(the ``poslab`` command and the grid workers do). It is not applied on import because it is
process-wide: the host program's freed memory would then stay with the process instead of going
back to the operating system.
"""

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
    trim thresholds reuses the pages: the freed memory stays with the process (its resident size is
    then the peak of its working set). Returns True if applied (glibc on Linux); set
    POSLAB_NO_MALLOC_TUNING=1 to skip. The ``poslab`` command calls it; importing the library changes
    nothing process-wide (``poslab bench`` with POSLAB_NO_MALLOC_TUNING=1 times what a library user
    gets without the call).
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
