"""Checkpoints: atomic writes, safe loading, one-line errors for damaged files."""

from __future__ import annotations

import errno
import pickle

import pytest
import torch

from poslab.lab import checkpoint
from poslab.lab.checkpoint import (
    FORMAT,
    CheckpointError,
    OutputError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    write_json,
)


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "step": 7,
        "config": {"train": {"steps": 10}},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data_rng": torch.Generator().manual_seed(3).get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def test_round_trip(tmp_path):
    state = _state()
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 7 and loaded["config"] == state["config"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert torch.equal(loaded["data_rng"], state["data_rng"])
    assert load_checkpoint(tmp_path / "c.pt")["format"] == FORMAT
    assert not [p for p in tmp_path.iterdir() if p.name != "c.pt"], "temporary file left behind"


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", _state())
    assert load_checkpoint(tmp_path)["step"] == 7


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_gives_one_line_error(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 20)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "corrupt" in message
    assert isinstance(info.value, ValueError)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a poslab checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "pwned"


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not _Payload.ran


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})

    def failing(tmp, data):
        tmp.write_bytes(data[:5])
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(checkpoint, "_write_bytes", failing)
    with pytest.raises(OutputError, match="cannot write .*results.json: No space left on device; free"):
        atomic_write(path, b'{"a": 2}')
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_json_stores_nan_as_null(tmp_path):
    write_json(tmp_path / "x.json", {"error": float("nan"), "list": (1.0, float("inf"))})
    assert (tmp_path / "x.json").read_text().split() == [
        "{",
        '"error":',
        "null,",
        '"list":',
        "[",
        "1.0,",
        "null",
        "]",
        "}",
    ]
