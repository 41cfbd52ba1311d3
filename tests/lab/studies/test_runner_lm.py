"""`poslab study` of an LM extrapolation study (also `poslab lm-study`): lm-extrapolation grids and a page."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import pytest
from test_declaration import tiny_lm_study

from conftest import tiny_lm_overrides, write_corpus
from poslab.lab import plotting
from poslab.lab.cli import main
from poslab.lab.presets import get_preset
from poslab.lab.report.datafile import DATA
from poslab.lab.report.stats import difference_cell, interval, paired_difference
from poslab.lab.studies.declaration import STUDIES, Part
from poslab.lab.studies.page import _hours
from poslab.lab.studies.runner import run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_study_end_to_end_resumes_and_shows_the_gap_and_the_paper(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    parts = (
        Part(name="a", preset="lm_stdlib_small"),
        Part(name="b", preset="lm_stdlib_small", overrides=("model.n_layers=1",)),
    )
    monkeypatch.setitem(STUDIES, "tiny", tiny_lm_study(parts=parts))
    out = tmp_path / "out"
    result = run_study("tiny", out, overrides=tiny_lm_overrides(corpus), max_windows=2, plots=False)
    page = (out / "README.md").read_text()
    assert page == result["page"]
    for name in ("a", "b"):
        assert result["results"][name]["settings"]["lengths"] == [16, 32, 64]  # up to factor x 16
        assert (out / name / "results.json").is_file()
    # The gap per part is DAPE-Kerple minus Kerple at 64, paired by seed: mean [95% interval], wins.
    res = result["results"]["b"]
    at = {(r["encoding"], r["seed"]): r["results"]["64"]["ppl_last"] for r in res["runs"]}
    gaps = [at["dape[base=kerple_log]", s] - at["kerple_log", s] for s in (0, 1)]
    gap_row = next(line for line in page.splitlines() if line.startswith("| b | "))
    assert f"{gaps[0]:+.2f}, {gaps[1]:+.2f}" in gap_row and "| 64 |" in gap_row
    gap = interval(gaps)
    wins = sum(g < 0 for g in gaps)
    assert f"| {gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}], {wins}/2 |" in gap_row
    n_params = {r["n_params"] for r in res["runs"] if r["encoding"] == "kerple_log"}
    lr = get_preset("lm_stdlib_small").override(tiny_lm_overrides(corpus)).train.lr
    assert f"| b | {n_params.pop()} | 3 | {lr:g} | 64 |" in gap_row
    # ... and beside it the same gap at the training length (16), paired by seed.
    at16 = {(r["encoding"], r["seed"]): r["results"]["16"]["ppl_last"] for r in res["runs"]}
    train_gap = paired_difference(
        {s: at16["dape[base=kerple_log]", s] for s in (0, 1)}, {s: at16["kerple_log", s] for s in (0, 1)}
    )
    assert gap_row.endswith(f"| {difference_cell(train_gap)} |")
    # The study's pair, at every length of each part, paired by seed.
    section = page.split("## b")[1]
    pair_row = next(line for line in section.splitlines() if line.startswith("| DAPE-Kerple minus Kerple |"))
    assert pair_row.endswith(f"| {gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}], {wins}/2 |")
    assert pair_row.count("/2") == 3  # 16, 32 and 64
    # Provenance: one line per machine record, with the commit the runs recorded (all one here).
    machine = json.loads((out / "b" / "kerple_log" / "seed0" / "results.json").read_text())["machine"]
    provenance = page.split("## Provenance")[1].split("## ")[0]
    assert f"| 8 | all | {machine['commit']} | {machine['cpu']} | {machine['isa']} |" in provenance
    # The paper's 512 from 128 (4x) sits beside ours at 64 (4 x 16).
    paper_row = next(line for line in page.splitlines() if line.startswith("| big | Kerple |"))
    assert "| 512 (4x) | 31.50* |" in paper_row and paper_row.count(" at 64") == 2  # unchecked: marked
    assert "The paper's numbers (marked *): not checked against the paper." in page
    # Every seed at the longest length, and the command.
    assert f"| Kerple | {at['kerple_log', 0]:.2f} | {at['kerple_log', 1]:.2f} |" in page
    assert "poslab study tiny --out" in page
    assert re.search(r"Compute: training \d+ s and scoring \d+ s, summed over runs", page)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 2 * 2 * 2 * 3  # parts x rows x seeds x lengths
    assert {row["row"] for row in rows} == {"Kerple", "DAPE-Kerple"}

    # Rerunning trains and scores nothing again (runs and scores are reused); other windows rescore
    # without retraining; --page-only rebuilds the same page.
    checkpoint = next((out / "a").rglob("checkpoint.pt"))
    mtimes = checkpoint.stat().st_mtime_ns, (out / "a" / "results.json").stat().st_mtime_ns
    again = run_study("tiny", out, overrides=tiny_lm_overrides(corpus), max_windows=2, plots=False)
    assert (checkpoint.stat().st_mtime_ns, (out / "a" / "results.json").stat().st_mtime_ns) == mtimes
    assert again["page"] == page
    one = run_study("tiny", out, overrides=tiny_lm_overrides(corpus), max_windows=1, plots=False)
    assert checkpoint.stat().st_mtime_ns == mtimes[0]
    assert set(one["results"]["a"]["settings"]["windows"].values()) == {1}
    run_study("tiny", out, overrides=tiny_lm_overrides(corpus), max_windows=2, plots=False)
    rebuilt = run_study("tiny", out, train=False, overrides=tiny_lm_overrides(corpus), max_windows=2)
    assert rebuilt["page"] == page
    if plotting.can_plot("the test"):  # the page-only rebuild redraws each part's figures from its data
        assert (out / "b" / "ppl_last.png").read_bytes()[:4] == b"\x89PNG"
    # The reading comes from notes.md, at the end of the page, and survives rebuilds.
    assert page.endswith("## Reading\n\n_Not written yet._\n")
    (out / "notes.md").write_text("\nKerple stays flat here.\n\n")
    same = {"overrides": tiny_lm_overrides(corpus), "max_windows": 2}
    noted = run_study("tiny", out, train=False, **same)["page"]
    assert noted == page.replace("_Not written yet._", "Kerple stays flat here.")
    assert (out / "README.md").read_text() == noted
    (out / "notes.md").write_bytes(b"\xff\xfe broken")
    with pytest.raises(ValueError, match=r"cannot read .*notes\.md"):
        run_study("tiny", out, train=False, **same)
    assert (out / "README.md").read_text() == noted  # the page written before is kept
    assert json.loads((out / "a" / "results.json").read_text())["settings"]["lengths"] == [16, 32, 64]


def test_lm_study_command_errors(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--max-windows", "0"]) == 2
    assert capsys.readouterr().err == "poslab: error: --max-windows must be a positive integer, got 0\n"
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--page-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poslab: error: no part of study 'dape_ablation' has results in")
    assert err.count("\n") == 1
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--page-only", "train.steps=x"]) == 2
    assert capsys.readouterr().err.startswith("poslab: error: ")
    assert main(["lm-study", "dape_nothing", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("poslab: error: unknown study 'dape_nothing'; known studies:")
    assert not out.exists()


def test_an_lm_study_rebuilds_and_resumes_from_its_data_file_alone(tmp_path, monkeypatch):
    """The runs and each part's scoring are recorded: with the run folders and the part's report
    gone, the page is the same, the report is written again, and a rerun trains and scores nothing;
    scoring again needs the checkpoints, which a clean clone does not have."""
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(STUDIES, "tiny", tiny_lm_study())
    out = tmp_path / "out"
    same = {"overrides": tiny_lm_overrides(corpus), "max_windows": 2, "plots": False}
    page = run_study("tiny", out, **same)["page"]
    report = {name: (out / "a" / name).read_bytes() for name in ("results.json", "results.csv", "table.md")}
    data = (out / DATA).read_bytes()
    records = [json.loads(line) for line in data.splitlines()]
    assert [r["kind"] for r in records] == ["run"] * 4 + ["scoring"]
    assert records[-1]["result"] == json.loads(report["results.json"])
    for run in sorted((out / "a").glob("*/seed*")):
        shutil.rmtree(run)
    for name in report:
        (out / "a" / name).unlink()
    rebuilt = run_study("tiny", out, train=False, **same)
    assert rebuilt["page"] == page and (out / "README.md").read_text() == page
    assert {name: (out / "a" / name).read_bytes() for name in report} == report
    again = run_study("tiny", out, **same)  # the recorded scoring of the very grid: nothing to do
    assert (again["trained"], again["page"]) == (0, page) and not list((out / "a").glob("*/seed*"))
    assert (out / DATA).read_bytes() == data
    with pytest.raises(
        ValueError, match=r"part a must be scored, which needs the checkpoints of its 4 recorded"
    ):
        run_study("tiny", out, **{**same, "max_windows": 1})
    assert (out / DATA).read_bytes() == data and not list((out / "a").glob("*/seed*"))


def test_a_study_scores_at_its_own_multiples_on_aligned_windows_and_reuses_that_scoring(
    tmp_path, monkeypatch
):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(STUDIES, "tiny", tiny_lm_study(lengths=(1, 2.5), aligned=True))
    out, same = tmp_path / "out", {"overrides": tiny_lm_overrides(corpus), "max_windows": 2, "plots": False}
    result = run_study("tiny", out, **same)
    settings = result["results"]["a"]["settings"]
    assert settings["lengths"] == [16, 40] and settings["aligned"] is True  # 2.5 x 16
    runs = result["results"]["a"]["runs"]
    assert all(set(run["results"]) == {"16", "40"} for run in runs)
    assert "| 40 |" in result["page"] or " 40 " in result["page"]
    page = result["page"]
    assert "Every seed at 40 (2.5x):" in page
    # On aligned windows, each seed's ratio of perplexities (same tokens, more context), and the pair's
    # difference of ratios, are on the page, computed from the runs' own scores.
    ratios = {
        (run["encoding"], run["seed"]): run["results"]["40"]["ppl_last"] / run["results"]["16"]["ppl_last"]
        for run in runs
    }
    table = page.split("over its own at 16")[1].split("Row A minus row B")[0].splitlines()
    for label, spec in (("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")):
        line = next(line for line in table if line.startswith(f"| {label} | "))
        assert line.split(" | ")[1:3] == [f"{ratios[spec, 0]:.3f}", f"{ratios[spec, 1]:.3f}"]
    gaps = [ratios["dape[base=kerple_log]", s] - ratios["kerple_log", s] for s in (0, 1)]
    assert f"{sum(gaps) / 2:+.3f} [" in page.split("| DAPE-Kerple minus Kerple |")[1].splitlines()[0]
    scored = (out / "a" / "results.json").stat().st_mtime_ns
    again = run_study("tiny", out, **same)  # the aligned scoring of the same grid is reused
    assert (out / "a" / "results.json").stat().st_mtime_ns == scored and again["page"] == result["page"]
    monkeypatch.setitem(STUDIES, "tiny", tiny_lm_study(lengths=(1, 2.5)))  # not aligned: scored again
    other = run_study("tiny", out, **same)
    assert other["results"]["a"]["settings"]["aligned"] is False
    assert "over its own at 16" not in other["page"] and "ratio 40/16" not in other["page"]


def test_compute_times_stay_readable_below_a_tenth_of_an_hour():
    assert [_hours(t) for t in (4.4, 59, 84, 359, 360, 5256)] == [
        "4 s", "59 s", "1.4 min", "6.0 min", "0.10 h", "1.46 h",
    ]  # fmt: skip
