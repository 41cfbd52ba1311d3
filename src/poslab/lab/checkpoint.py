"""Checkpoints and run files, written atomically and read without executing pickled code.

A checkpoint holds everything an interrupted run needs to continue exactly as if it had not been
interrupted: the model and optimizer states, the step (the learning-rate schedule is a function of
it), the training-data generator state and the torch RNG states, plus the run config (a plain dict)
so that a checkpoint file evaluates on its own. Files are written to a temporary name in the same
directory and moved into place with ``os.replace``: a crash mid-write leaves the old file intact
(`poslab.lab.rundir.RunDir` removes temporary files whose process is gone); a full disk or a read-only
directory raises `OutputError`, a ValueError with a one-line message.
Loading uses ``torch.load(weights_only=True)`` (tensors and plain containers only); an unreadable
file raises `CheckpointError` with a one-line message.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "poslab-checkpoint"
VERSION = 1
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"  # temporary files: .<name>.<pid>.tmp
REQUIRED = ("format", "version", "step", "config", "model", "optimizer", "data_rng", "torch_rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, truncated or not a poslab checkpoint."""


class OutputError(ValueError):
    """A file or directory that cannot be written: a full disk, a read-only place, no permission."""


# What the user can do about each cause (errno -> advice).
_ADVICE = {
    errno.ENOSPC: "free some space, then run the command again (--resume continues a run)",
    errno.EDQUOT: "free some space, then run the command again (--resume continues a run)",
    errno.EROFS: "give an output directory on a writable file system",
    errno.EACCES: "give an output directory you may write to",
    errno.EPERM: "give an output directory you may write to",
}


def output_error(path: str | Path, error: OSError) -> OutputError:
    """The `OutputError` of an OSError met while writing ``path``: one line with the cause."""
    cause = error.strerror or str(error)
    advice = _ADVICE.get(error.errno)
    return OutputError(f"cannot write {path}: {cause}" + (f"; {advice}" if advice else ""))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to disk: every file poslab writes goes through here."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path`` and move it into place in one step
    (``os.replace``); `OutputError` when the disk is full or the place read-only, leaving ``path``
    as it was."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    except OSError as error:
        raise output_error(path, error) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(directory: str | Path) -> None:
    """Raise `OutputError` unless a file can be created in ``directory`` (or, when it does not exist
    yet, in its nearest existing parent); leaves nothing behind. Commands call it before long work
    whose results go there."""
    directory = Path(directory).absolute()
    place = directory
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise OutputError(f"cannot write {directory}: {place} is not a directory")
    probe = place / f"{TMP_PREFIX}probe.{os.getpid()}{TMP_SUFFIX}"
    try:
        _write_bytes(probe, b"")
    except OSError as error:
        raise output_error(directory, error) from None
    finally:
        if probe.exists():  # unlink itself fails on a read-only file system, even for no file
            probe.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, text.encode())


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
    # Serialised in memory first: torch.save's own writer turns a full disk into an unexplained
    # "unexpected pos" RuntimeError, our write gives the OS error itself.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())


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
