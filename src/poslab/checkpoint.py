"""Checkpoints and run files, written atomically and read without executing pickled code.

A checkpoint holds everything an interrupted run needs to continue exactly as if it had not been
interrupted: the model and optimizer states, the step (the learning-rate schedule is a function of
it), the training-data generator state and the torch RNG states, plus the run config (a plain dict)
so that a checkpoint file evaluates on its own. Files are written to a temporary name in the same
directory and moved into place with ``os.replace``: a crash mid-write leaves the old file intact.
Loading uses ``torch.load(weights_only=True)`` (tensors and plain containers only); an unreadable
file raises `CheckpointError` with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "poslab-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "step", "config", "model", "optimizer", "data_rng", "torch_rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, truncated or not a poslab checkpoint."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step (``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def json_safe(value: Any) -> Any:
    """A copy that strict JSON can hold: NaN and infinities become None, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (NaN and infinities as null)."""
    write_text(path, json.dumps(json_safe(data), indent=2) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (see `REQUIRED` for its keys) atomically."""
    missing = [k for k in REQUIRED if k not in state and k not in ("format", "version")]
    assert not missing, f"checkpoint state lacks {missing}"
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; `CheckpointError` with a one-line message if unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged zip or pickle
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt, truncated or not a torch "
            f"checkpoint ({reason[:120]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a poslab checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')!r}; this poslab reads {VERSION}"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
