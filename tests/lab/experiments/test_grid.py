"""Grids of encodings x seeds: where runs are placed, and clashes refused."""

from __future__ import annotations

import pytest

from poslab.lab.experiments.grid import plan_grid
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
