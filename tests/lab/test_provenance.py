"""Every run records the commit of the code, the CPU and its instruction set, and the threads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

import poslab
from poslab.lab import provenance


def test_the_commit_is_the_checkouts_head():
    provenance.code_commit.cache_clear()
    source = Path(poslab.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    recorded = provenance.code_commit()
    if head.returncode == 0:
        assert recorded.removesuffix("+dirty") == head.stdout.strip()[:12]
    else:
        assert recorded == f"poslab {poslab.__version__}"


def test_without_git_the_version_is_recorded(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    provenance.code_commit.cache_clear()
    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    try:
        assert provenance.code_commit() == f"poslab {poslab.__version__}"
    finally:
        provenance.code_commit.cache_clear()


def test_the_machine_record_names_cpu_isa_threads_and_commit():
    record = provenance.machine_record()
    assert set(record) == {"cpu", "isa", "threads", "torch", "commit"}
    assert record["threads"] == torch.get_num_threads()
    assert record["isa"] in {"x86-64-v2", "x86-64-v3", "x86-64-v4", "x86-64", "other"}
    assert record["cpu"]
