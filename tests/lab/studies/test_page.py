"""A study's page: the values its cells read."""

from __future__ import annotations

import csv

import pytest
import torch

from poslab.lab import plotting
from poslab.lab.evaluate import eval_seed
from poslab.lab.presets import get_preset
from poslab.lab.report.stats import difference_cell, interval, paired_difference
from poslab.lab.studies.declaration import STUDIES, TASK_TABLE, NumbersCheck, Part, Study
from poslab.lab.studies.page import (
    _intervals,
    _pair_lines,
    _value,
    depth_maps,
    draw_bars,
    numbers_note,
    paper_value,
    position_blind_floor,
)
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
        low, high = max(stats["low"], 0.0), min(stats["high"], 100.0)  # cut to accuracy's range
        assert f"{stats['mean']:.1f} [{low:.1f}, {high:.1f}] (2)" in page
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


def _interval_text(study, values: dict[str, list[float]]) -> str:
    """The intervals section of ``study``'s page for these per-seed values of one pass-key column."""
    rows = [
        {"row": row, "column": "passkey/by_length@128", "seed": seed, "value": value}
        for row, vs in values.items()
        for seed, value in enumerate(vs)
    ]
    return "\n".join(_intervals(study, rows))


def test_interval_and_difference_cells_from_known_values():
    study = _probe_study("RoPE")
    text = _interval_text(
        study, {"RoPE": [50.0, 60.0, 70.0], "NoPE": [20.0, 10.0, 75.0], "ALiBi": [90.0, 95.0]}
    )
    # RoPE: mean 60, std 10, t(2) = 4.303: 60 +- 24.84
    assert "| RoPE | 60.0 [35.2, 84.8] (3) |" in text
    # NoPE: mean 35, std 35, 35 +- 86.95 runs past both ends of accuracy's range and is cut to it
    assert "| NoPE | 35.0 [0.0, 100.0] (3) |" in text and "cut to 0-100, the metric's range" in text
    # NoPE - RoPE: -30, -50, +5; NoPE wins (higher accuracy) on seed 2 only
    diff = paired_difference({0: 20.0, 1: 10.0, 2: 75.0}, {0: 50.0, 1: 60.0, 2: 70.0}, lower_is_better=False)
    assert diff["wins"] == 1 and f"| NoPE | {difference_cell(diff, 1)} |" in text
    assert "| ALiBi | +37.5 [" in text and ", 2/2 |" in text  # paired on seeds 0 and 1 only
    assert "cut to -100..+100" not in text  # no difference's interval runs past the metric's span


def test_a_difference_interval_is_cut_to_the_most_two_percentages_can_differ():
    study = _probe_study("RoPE")
    text = _interval_text(
        study, {"RoPE": [0.0, 100.0, 0.0], "NoPE": [100.0, 0.0, 100.0], "ALiBi": [10.0, 90.0, 20.0]}
    )
    # NoPE - RoPE: +100, -100, +100: mean 33.3, std 115.5, 33.3 +- 286.9, far past -100..+100
    assert "| NoPE | +33.3 [-100.0, +100.0], 2/3 |" in text
    # ALiBi - RoPE: +10, -10, +20: mean 6.7, std 15.3, 6.7 +- 37.9: inside, as Student's t gives it
    assert "| ALiBi | +6.7 [-31.3, +44.6], 2/3 |" in text
    assert "interval (cut to -100..+100, the most two values of the metric can differ" in text


def test_a_reference_must_be_one_of_the_rows():
    with pytest.raises(ValueError, match="reference 'T5' is not one of its rows"):
        _probe_study("T5")


def test_the_position_blind_floor_is_the_better_of_two_answers_on_the_scored_sequences():
    # Reverse string, scored at 41 and 46: recomputed here from the task's own evaluation sequences.
    config = get_preset("chomsky_cpu").override(
        ["task.name=reverse_string", "task.options.max_eval_len=46", "eval.batch_size=8", "eval.batches=2"]
    )
    task = config.task.build()
    per_length = {"constant 0": [], "constant 1": [], "majority": []}
    for length in (41, 46):
        generator = torch.Generator().manual_seed(eval_seed(config.eval.seed, "ood", length))
        scores = {key: [] for key in per_length}
        for _ in range(2):
            batch = task.sample(8, length, generator=generator, **task.splits()["ood"])
            x = batch.inputs[:, :length]
            majority = (x.sum(dim=1) * 2 > length).long()  # ties (none at odd 41) to '0'
            for key, answer in (("constant 0", 0), ("constant 1", 1), ("majority", majority[:, None])):
                correct = (batch.targets == answer) & batch.mask
                scores[key].append(100 * correct.sum().item() / batch.mask.sum().item())
        for key in per_length:
            per_length[key].append(sum(scores[key]) / 2)
    expected = {key: sum(vs) / 2 for key, vs in per_length.items()}
    assert expected["majority"] > max(expected["constant 0"], expected["constant 1"]) > 45
    assert position_blind_floor(config, "ood") == pytest.approx(expected["majority"])


def test_paper_numbers_are_marked_unless_verified():
    base = _probe_study(None).__dict__
    verified = Study(**{**base, "numbers_check": NumbersCheck(verified=True, note="table 3 of v2")})
    unverified = Study(**{**base, "numbers_check": NumbersCheck(verified=False, note="tried X")})
    assert paper_value(verified, 1.2) == "1.2" and paper_value(unverified, 1.2) == "1.2*"
    assert paper_value(Study(**base), 67.6) == "67.6*"  # not checked at all
    assert numbers_note(verified) == "The paper's numbers: verified, table 3 of v2."
    assert numbers_note(unverified) == "The paper's numbers (marked *): unverified, tried X."
    with pytest.raises(ValueError, match="needs a note"):
        NumbersCheck(verified=True, note=" ")


def _two_column_rows(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    return [
        {"row": row, "column": column, "seed": seed, "value": value}
        for row, columns in values.items()
        for column, vs in columns.items()
        for seed, value in enumerate(vs)
    ]


def test_pairs_are_paired_differences_per_column_and_of_the_ratio(tmp_path):
    study = Study(
        kind=TASK_TABLE,
        name="tiny_lm",
        title="",
        source="",
        metric="ppl",
        rows=(("A", "rope"), ("B", "alibi")),
        parts=(Part(name="p", preset="lm_stdlib_small", splits=("validation@128", "validation@320")),),
        numbers={"A": {"p/validation@128": 20.0}},
        ratio=("p/validation@320", "p/validation@128"),
        pairs=(("A", "B"),),
    )
    rows = _two_column_rows(
        {
            "A": {"p/validation@128": [10.0, 12.0, 11.0], "p/validation@320": [11.0, 12.0, 10.0]},
            "B": {"p/validation@128": [11.0, 12.5, 12.0], "p/validation@320": [12.0, 13.0, 12.0]},
        }
    )
    text = "\n".join(_pair_lines(study, rows))
    at_128 = difference_cell(paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 11.0, 1: 12.5, 2: 12.0}))
    assert at_128 == "-0.83 [-1.55, -0.12], 3/3"
    ratios = paired_difference({0: 1.1, 1: 1.0, 2: 10 / 11}, {0: 12 / 11, 1: 13 / 12.5, 2: 1.0})
    assert f"| A minus B | {at_128} | " in text and text.endswith(f"| {difference_cell(ratios, 3)} |")
    assert "ratio" in text.split("| A minus B |")[0]
    if plotting.can_plot("the test"):
        assert draw_bars(study, rows, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
