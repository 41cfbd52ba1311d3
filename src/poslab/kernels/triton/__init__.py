"""Triton kernels for ``attend(..., impl="triton")``: bias encodings (ALiBi, Kerple, T5, FIRE,
Sandwich) and CoPE, forward and backward, tiled over keys (docs/attention.md, Triton kernels).

Nothing here imports triton at ``import poslab`` time: ``available()`` looks for it, and the kernel
modules (``bias``, ``cope``) are imported on first use. On a machine without a GPU the kernels run
through triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported (the tests).
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from poslab.encodings.base import PositionEncoding
from poslab.kernels.triton.common import interpreting

_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether triton can be imported (cached after the first call)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            if importlib.util.find_spec("triton") is None:
                _AVAILABLE = False
            else:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _AVAILABLE = True
        except Exception:  # a broken install (or a blocked import) counts as none
            _AVAILABLE = False
    return _AVAILABLE


def runnable_on(q: Tensor) -> bool:
    """Whether the kernels can run on ``q``'s device: CUDA, or any device under the interpreter."""
    return available() and (q.is_cuda or interpreting())


def plan(encoding: PositionEncoding | None, *, causal: bool = True) -> str | None:
    """Which kernel runs ``encoding``: 'none' (NoPE, or a rotation only), 'table' (a bias of the
    signed distance alone, tabulated per head), 'fire', 'cope', 'dape', or None (no Triton kernel)."""
    from poslab.kernels.triton.dispatch import plan as _plan

    return _plan(encoding, causal=causal)


def auto_enabled() -> bool:
    """Whether ``impl="auto"`` may pick the Triton kernels on CUDA: unless POSLAB_TRITON=0."""
    return os.environ.get("POSLAB_TRITON", "1") != "0"


def triton_attention(q, k, v, encoding, q_pos, *, causal: bool, extra_keys=None) -> Tensor:
    """Attention with ``encoding`` through the Triton kernels; q and k already rotated. ValueError
    when triton is missing, the device cannot run it, or the encoding has no kernel."""
    if not available():
        raise ValueError('attend(impl="triton") needs triton: pip install "poslab[gpu]"')
    if not runnable_on(q):
        raise ValueError(
            f'attend(impl="triton") runs on CUDA tensors (or under TRITON_INTERPRET=1), got {q.device}'
        )
    from poslab.kernels.triton.dispatch import run

    return run(q, k, v, encoding, q_pos, causal=causal, extra_keys=extra_keys)
