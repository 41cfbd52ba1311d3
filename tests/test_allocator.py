"""``poslab.tune_allocator``: applied only when called, skipped with POSLAB_NO_MALLOC_TUNING=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "import poslab\n"
    "from poslab import allocator\n"
    "print(allocator.allocator_tuned(), poslab.tune_allocator(), allocator.allocator_tuned())\n"
)


def run_fresh(**env: str) -> str:
    """The three values of CODE in a fresh process (the setting is process-wide)."""
    environ = {k: v for k, v in os.environ.items() if k != "POSLAB_NO_MALLOC_TUNING"} | env
    return subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env=environ
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_changes_nothing_and_the_call_tunes():
    assert run_fresh() == "False True True"


def test_the_environment_switches_it_off():
    assert run_fresh(POSLAB_NO_MALLOC_TUNING="1") == "False False False"
