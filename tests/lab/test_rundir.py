"""RunDir: a run directory's files, status and loading have one home."""

from __future__ import annotations

import pytest

from poslab.lab.presets import get_preset
from poslab.lab.rundir import CHECKPOINT, CONFIG, RESULTS, RunDir, RunDirError, find_trained_runs
from poslab.lab.train import train


def test_run_dir_owns_status_files_and_loading(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.status() == "empty" and not run.is_finished()
    config = get_preset("smoke").override({"train.steps": 2, "train.device": "cpu", "eval.batches": 1})
    train(config, run.path, progress=False)
    assert run.status() == "finished" and run.is_finished() and run.has_checkpoint()
    assert {CONFIG, RESULTS, CHECKPOINT} <= {p.name for p in run.path.iterdir()}
    assert run.load_config() == config
    assert run.load_results()["step"] == 2 and run.train_wall_time() > 0
    loaded = run.load_model()
    assert loaded.step == 2 and loaded.label == "rope" and not loaded.model.training
    assert find_trained_runs([tmp_path]) == [run.path]
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run.check(resume=False, overwrite=False)
    run.clear()
    assert run.status() == "empty"
