"""The study layout, ``OUT/<part>/<encoding>/seed<k>``, and the migration of the old LM-study one."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import tiny_lm_overrides, write_corpus
from poslab.lab.experiments.extrapolation import run_experiment
from poslab.lab.rundir import RunDir
from poslab.lab.studies import layout
from poslab.lab.studies.declaration import LM_EXTRAPOLATION, STUDIES, PaperNumber, Part, Study
from poslab.lab.studies.page import lm_page
from poslab.lab.studies.runner import run_study

pytestmark = pytest.mark.usefixtures("one_thread")

OLD_STUDY = Study(
    kind=LM_EXTRAPOLATION,
    name="old",
    title="An LM study made before the study layout",
    source="a test",
    rows=(("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")),
    parts=(Part(name="a", preset="lm_stdlib_small"),),
    paper_setting="none",
    factor=2,
    seeds=(0,),
    gap=("DAPE-Kerple", "Kerple"),
    paper_numbers=(PaperNumber(setting="big", row="Kerple", train_len=128, length=256, value=31.5),),
)


def test_new_run_dir_drops_the_old_runs_folder():
    assert layout.new_run_dir("docs/results/x/stdlib/runs/alibi/seed0") == "docs/results/x/stdlib/alibi/seed0"
    assert layout.new_run_dir("/abs/a/runs/dape_base=fire/seed2") == "/abs/a/dape_base=fire/seed2"
    assert layout.new_run_dir("docs/results/x/stdlib/alibi/seed0") == "docs/results/x/stdlib/alibi/seed0"


def test_an_old_lm_study_folder_loads_migrated_and_its_page_rebuilds_identically(tmp_path, monkeypatch):
    monkeypatch.setitem(STUDIES, "old", OLD_STUDY)
    overrides = tiny_lm_overrides(write_corpus(tmp_path / "corpus"))
    out = tmp_path / "out"
    # The old layout, as `poslab lm-study` made it: each part an lm-extrapolation grid, runs in runs/.
    run_experiment(
        "lm_stdlib_small",
        OLD_STUDY.specs,
        [0],
        out / "a",
        max_len=32,
        max_windows=2,
        overrides=overrides,
        plots=False,
    )
    assert (out / "a" / "runs" / "kerple_log" / "seed0" / "results.json").is_file()
    old = json.loads((out / "a" / "results.json").read_text())
    command = "poslab lm-study old --out OUT"
    before = lm_page(OLD_STUDY, {"a": old}, command=command)  # the page from the old folder as it is
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "a" / "runs").rglob("checkpoint.pt")}

    page = run_study("old", out, train=False, overrides=overrides, max_windows=2, command=command)["page"]

    assert page == before and (out / "README.md").read_text() == before
    assert not (out / "a" / "runs").exists()
    migrated = json.loads((out / "a" / "results.json").read_text())
    assert migrated["settings"] == old["settings"]
    assert [run["run_dir"] for run in migrated["runs"]] == [
        str(out / "a" / "kerple_log" / "seed0"),
        str(out / "a" / "dape_base=kerple_log" / "seed0"),
    ]
    assert all(RunDir(run["run_dir"]).is_finished() for run in migrated["runs"])
    rows = list(csv.DictReader((out / "a" / "results.csv").open()))
    assert {row["run_dir"] for row in rows} == {run["run_dir"] for run in migrated["runs"]}
    # Trained and scored runs stand: a full run of the study reuses them and writes the same page.
    again = run_study("old", out, overrides=overrides, max_windows=2, command=command)
    assert again["trained"] == 0 and again["page"] == before
    moved = {out / "a" / p.relative_to(out / "a" / "runs") for p in checkpoints}
    assert {p: p.stat().st_mtime_ns for p in moved} == {
        out / "a" / p.relative_to(out / "a" / "runs"): t for p, t in checkpoints.items()
    }


def test_a_run_in_both_layouts_stops_the_migration_before_anything_moves(tmp_path):
    for folder in ("a/runs/rope/seed0", "a/rope/seed0", "a/runs/nope/seed0"):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match="both exist; keep one of them"):
        layout.migrate(tmp_path, ["a"])
    assert (tmp_path / "a" / "runs" / "nope").is_dir() and not (tmp_path / "a" / "nope").exists()
    assert layout.migrate(tmp_path, ["b"]) == []  # nothing of the old layout: nothing moves
