"""Where and with what code a run was made: recorded in every results.json so that a page built
later, on another machine, can tie each number to its commit, CPU, instruction set and threads."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

import poslab
from poslab.kernels.native import cpu_model, supported_levels


@cache
def code_commit() -> str:
    """The git commit of the poslab source that is running, with ``+dirty`` when the working tree
    differs from it; ``poslab <version>`` when it is not run from a git checkout."""
    source = Path(poslab.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            raise OSError(commit.stderr)
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return f"poslab {poslab.__version__}"
    dirty = "+dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return commit.stdout.strip()[:12] + dirty


def machine_record() -> dict[str, Any]:
    """The CPU model, the highest x86-64 level it runs (the instruction set the C++ kernels use), the
    torch thread count and version, and the code's commit."""
    levels = supported_levels()
    return {
        "cpu": cpu_model(),
        "isa": levels[0] if levels else "other",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": code_commit(),
    }
