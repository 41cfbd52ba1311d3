"""A study's page: the values its cells read."""

from __future__ import annotations

import csv

import pytest

from poslab.lab import plotting
from poslab.lab.report.stats import difference_cell, interval, paired_difference
from poslab.lab.studies.declaration import STUDIES, TASK_TABLE, Part, Study
from poslab.lab.studies.page import _intervals, _value, depth_maps
from poslab.lab.studies.runner import plan_study, run_study


def test_a_column_at_a_length_reads_that_lengths_value():
    results = {
        "metrics": {
            "splits": {"validation": {"ppl": 20.5}},
            "lengths": {"validation": {"128": {"ppl": 19.75}, "320": {"ppl": 21.25, "loss": 3.0}}},
        }
    }
    assert _value(results, "validation@320", "ppl") == 21.25
    assert _value(results, "validation@128", "ppl") == 19.75
    assert _value(results, "validation", "ppl") == 20.5
    # A length (or split) the run did not score is a missing cell, as a missing split is.
    assert _value(results, "validation@256", "ppl") is None
    assert _value(results, "test@320", "ppl") is None
    assert _value({"metrics": {"splits": {}}}, "validation@320", "ppl") is None


def _probe_study(reference):
    # A tiny pass-key benchmark: 3 rows, 2 seeds, 4 steps on a 32-token pass key scored at 96 and 128.
    fast = (
        "train.steps=4",
        "train.checkpoint_every=0",
        "eval.batches=1",
        "eval.batch_size=2",
        "model.d_model=16",
        "task.train_len=96",
        "task.options.eval_lengths=96,128",
        "task.options.eval_depths=0.0,1.0",
    )
    return Study(
        kind=TASK_TABLE,
        name="tiny_probe",
        title="Tiny probe",
        source="a test",
        metric="accuracy",
        rows=(("NoPE", "nope"), ("RoPE", "rope"), ("ALiBi", "alibi")),
        parts=(Part(name="passkey", preset="passkey_small", overrides=fast, splits=("by_length@128",)),),
        plot=("by_length",),
        reference=reference,
        seeds=(0, 1),
    )


def test_a_table_without_paper_numbers_shows_intervals_differences_and_depth_maps(tmp_path, monkeypatch):
    study = _probe_study("RoPE")
    monkeypatch.setitem(STUDIES, "tiny_probe", study)
    run_study("tiny_probe", tmp_path / "p", threads=1)
    page = (tmp_path / "p" / "README.md").read_text()
    with (tmp_path / "p" / "results.csv").open() as f:
        values = {(r["row"], int(r["seed"])): float(r["value"]) for r in csv.DictReader(f)}
    for row in ("NoPE", "ALiBi"):
        mine = {s: values[(row, s)] for s in (0, 1)}
        rope = {s: values[("RoPE", s)] for s in (0, 1)}
        cell = difference_cell(paired_difference(mine, rope, lower_is_better=False), 1)
        assert f"| {row} | {cell} |" in page
        stats = interval(list(mine.values()))
        assert f"{stats['mean']:.1f} [{stats['low']:.1f}, {stats['high']:.1f}] (2)" in page
    assert "paper" not in page.split("## Results")[1].split("###")[0]  # no empty paper columns
    against = page.split("### Against RoPE")[1].split("## ")[0]
    assert "| NoPE | " in against and "| RoPE | " not in against
    maps = depth_maps(study, plan_study(study, tmp_path / "p", [0, 1])["passkey"])
    assert sorted(maps) == ["ALiBi", "NoPE", "RoPE"]
    depths, lengths, grid = maps["RoPE"]
    assert depths == [0, 100] and lengths == [96, 128] and len(grid) == 2 and len(grid[0]) == 2
    assert all(0 <= v <= 100 for line in grid for v in line)
    if plotting.can_plot("the test"):
        assert (tmp_path / "p" / "plots" / "passkey_depth.png").stat().st_size > 0
        assert "![passkey by depth](plots/passkey_depth.png)" in page


def test_interval_and_difference_cells_from_known_values():
    study = _probe_study("RoPE")
    column = "passkey/by_length@128"
    values = {"RoPE": [50.0, 60.0, 70.0], "NoPE": [20.0, 10.0, 75.0], "ALiBi": [90.0, 95.0]}
    rows = [
        {"row": row, "column": column, "seed": seed, "value": value}
        for row, vs in values.items()
        for seed, value in enumerate(vs)
    ]
    text = "\n".join(_intervals(study, rows))
    # RoPE: mean 60, std 10, t(2) = 4.303: 60 +- 24.84
    assert "| RoPE | 60.0 [35.2, 84.8] (3) |" in text
    # NoPE - RoPE: -30, -50, +5; NoPE wins (higher accuracy) on seed 2 only
    diff = paired_difference({0: 20.0, 1: 10.0, 2: 75.0}, {0: 50.0, 1: 60.0, 2: 70.0}, lower_is_better=False)
    assert diff["wins"] == 1 and f"| NoPE | {difference_cell(diff, 1)} |" in text
    assert "| ALiBi | +37.5 [" in text and ", 2/2 |" in text  # paired on seeds 0 and 1 only


def test_a_reference_must_be_one_of_the_rows():
    with pytest.raises(ValueError, match="reference 'T5' is not one of its rows"):
        _probe_study("T5")
