"""Grids of encodings x seeds: where runs are placed, and clashes refused."""

from __future__ import annotations

import json
import logging

import pytest

from poslab.lab.experiments.grid import _fraction_left, _GridProgress, plan_grid
from poslab.lab.presets import get_preset


def test_grid_places_runs_and_refuses_clashes(tmp_path):
    base = get_preset("smoke")
    grid = plan_grid(base, ["nope", "dape[base=alibi]"], [0, 1], tmp_path, resume=False, overwrite=False)
    assert [str(run.path.relative_to(tmp_path)) for run in grid] == [
        "nope/seed0",
        "nope/seed1",
        "dape_base=alibi/seed0",
        "dape_base=alibi/seed1",
    ]
    assert grid[3].config.train.seed == 1 and grid[2].config.model.encoding == "dape[base=alibi]"
    with pytest.raises(ValueError, match="same directory"):
        plan_grid(base, ["rope", "rope"], [0], tmp_path, resume=False, overwrite=False)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_time_left_shares_queued_and_running_work_between_the_workers(tmp_path, caplog):
    grid = plan_grid(get_preset("smoke"), ["nope"], [0, 1, 2, 3], tmp_path, resume=False, overwrite=False)
    clock = _Clock()
    progress = _GridProgress(grid, 2, clock=clock)
    with caplog.at_level(logging.INFO, logger="poslab"):
        progress.starting(grid[0])
        progress.starting(grid[1])
        clock.now = 10.0  # one run takes 10 s on one worker
        progress.finished(grid[0])
        progress.starting(grid[2])
        clock.now = 12.0
        progress.finished(grid[1])
        progress.starting(grid[3])
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "run 1/4: nope seed 0" and lines[1] == "run 2/4: nope seed 1"  # nothing known
    # At 10 s: seed 1 is due now, seeds 2 and 3 take 10 s each: 20 s of work on 2 workers.
    assert lines[2].endswith("; about 0:10 left") and lines[3].endswith("; about 0:10 left")
    # At 12 s (11 s per run): seed 2 has 9 s left, seed 3 all of its 11: at least the longer of them.
    assert lines[4].endswith("; about 0:11 left") and lines[5] == "run 4/4: nope seed 3; about 0:11 left"


def test_a_resumed_run_counts_only_the_steps_it_has_left(tmp_path):
    grid = plan_grid(get_preset("smoke"), ["nope"], [0], tmp_path, resume=False, overwrite=False)
    run = grid[0]
    steps = run.config.train.steps
    assert _fraction_left(run) == 1.0  # nothing there: a new run
    run.path.mkdir(parents=True)
    records = [{"step": s, "kind": "train"} for s in range(0, steps * 3 // 4 + 1, max(1, steps // 4))]
    (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": ')
    assert _fraction_left(run) == 1.0  # metrics without a checkpoint: it starts again from step 0
    (run.path / "checkpoint.pt").write_bytes(b"")
    assert _fraction_left(run) == pytest.approx(1 - records[-1]["step"] / steps)  # the torn line skipped
    (run.path / "metrics.jsonl").write_text(json.dumps({"step": steps}) + "\n")
    assert _fraction_left(run) == 0.05  # at its last step: its final evaluation is left
