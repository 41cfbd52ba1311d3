"""`poslab reproduce`: a paper table's grids, resumed, and its page built from the per-run files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from poslab.cli import main
from poslab.experiments import paper_tables
from poslab.experiments.paper_tables import TABLES, PaperTable, Part, get_table
from poslab.experiments.reproduce import part_config, reproduce
from poslab.presets import list_presets

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("train.steps=4", "train.checkpoint_every=2", "eval.batches=1")


@pytest.fixture
def tiny_table(monkeypatch):
    """A two-part table on the smoke preset: (NoPE, RoPE) x (8 and 6 pairs)."""
    table = PaperTable(
        name="tiny",
        title="Tiny flip-flop",
        source="a test",
        metric="error",
        rows=(("No PE", "nope"), ("RoPE", "rope")),
        parts=(
            Part(
                name="short", cpu="smoke", paper="flipflop_paper", overrides=FAST, splits=("id", "ood_dense")
            ),
            Part(name="shorter", cpu="smoke", paper="flipflop_paper", overrides=(*FAST, "task.train_len=6")),
        ),
        numbers={"RoPE": {"short/id": 1.8, "shorter/id": 0.5}},
        paper_setting="none",
        seeds=(0, 1),
    )
    monkeypatch.setitem(TABLES, "tiny", table)
    return table


def test_every_table_names_real_presets_encodings_and_columns():
    assert {"cope_flipflop", "cope_selective_copy", "cope_counting"} <= set(TABLES)
    for table in TABLES.values():
        assert any("dape" in spec for _, spec in table.rows)  # the row beyond the paper
        for part in table.parts:
            assert part.cpu in list_presets() and part.paper in list_presets()
            for scale in ("cpu", "paper"):
                config = part_config(part, scale)
                for _, spec in table.rows:
                    config.override({"model.encoding": spec}).model.to_model_config(
                        vocab_size=8, n_outputs=None, causal=True
                    ).build_encoding()
        assert set(table.numbers) <= {row for row, _ in table.rows}


def test_table_numbers_must_name_its_rows_and_columns():
    part = Part(name="p", cpu="smoke", paper="smoke")
    with pytest.raises(ValueError, match="rows it does not have"):
        PaperTable(
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"B": {"p/id": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown columns"):
        PaperTable(
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"A": {"p/ood": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown table 'nope'; tables: .*cope_flipflop"):
        get_table("nope")


def test_reproduce_trains_every_part_and_the_page_holds_each_runs_numbers(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = reproduce("tiny", out, jobs=1)
    assert (result["finished"], result["planned"], result["trained"]) == (8, 8, 8)
    page = (out / "README.md").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * (2 + 1)  # rows x seeds x (columns of short + shorter)
    for row in rows:  # every value is the run's own results.json value
        split = row["column"].split("/")[1]
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert float(row["value"]) == pytest.approx(results["metrics"]["splits"][split]["error"])
        assert results["machine"]["cpu"] in page
    # the RoPE cell of short/id: mean ± std of its two seeds beside the paper's 1.8
    values = [float(r["value"]) for r in rows if r["row"] == "RoPE" and r["column"] == "short/id"]
    mean = sum(values) / 2
    std = abs(values[0] - values[1]) / 2**0.5
    line = next(ln for ln in page.splitlines() if ln.startswith("| RoPE | ") and "1.8" in ln)
    assert line.split(" | ")[1:3] == [f"{mean:.2f} ± {std:.2f} (2)", "1.8"]
    assert "8 of 8 runs finished" in page and "Incomplete" not in page
    assert "poslab reproduce tiny --out" in page and "## Reading" in page and "Not written yet" in page


def test_reproduce_resumes_keeps_finished_runs_and_the_notes(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    reproduce("tiny", out, seeds=[0], jobs=1)
    finished = out / "short" / "rope" / "seed0" / "results.json"
    before = finished.read_bytes()
    (out / "notes.md").write_text("RoPE beats NoPE here, as in the paper.\n")
    result = reproduce("tiny", out, seeds=[0, 1], jobs=1)
    assert result["trained"] == 4 and result["finished"] == 8
    assert finished.read_bytes() == before
    assert "RoPE beats NoPE here, as in the paper." in (out / "README.md").read_text()


def test_page_only_reports_missing_runs_without_training(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = reproduce("tiny", out, train=False)
    assert result["trained"] == 0 and result["finished"] == 0
    page = (out / "README.md").read_text()
    assert "**Incomplete**: 8 runs not finished" in page
    assert not (out / "short" / "rope" / "seed0" / "results.json").exists()


def test_a_finished_run_of_another_config_stops_the_table_before_training(tiny_table, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    reproduce("tiny", out, seeds=[0], jobs=1)
    changed = Part(name="short", cpu="smoke", paper="flipflop_paper", overrides=(*FAST, "train.lr=0.01"))
    monkeypatch.setitem(
        TABLES, "tiny", PaperTable(**{**tiny_table.__dict__, "parts": (changed, tiny_table.parts[1])})
    )
    before = sorted(p.name for p in (out / "short").rglob("*"))
    with pytest.raises(ValueError, match="different config.*train.lr"):
        reproduce("tiny", out, seeds=[0], jobs=1)
    assert sorted(p.name for p in (out / "short").rglob("*")) == before


def test_cli_reproduce_errors_are_one_line_with_exit_2(tiny_table, tmp_path, capsys):
    assert main(["reproduce", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert "unknown table 'nosuch'" in capsys.readouterr().err
    assert main(["reproduce", "tiny", "--out", str(tmp_path / "x"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["reproduce", "tiny", "--out", str(blocker / "sub"), "--page-only"]) == 2
    assert capsys.readouterr().err.startswith("poslab: error:")
    assert blocker.read_text() == "not a directory"


def test_cli_reproduce_prints_the_comparison(tiny_table, tmp_path, capsys):
    code = main(
        ["reproduce", "tiny", "--out", str(tmp_path / "t"), "--seeds", "0", "--jobs", "1", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "## Ours beside the paper's" in out and "## Every seed" not in out
    assert "4 of 4 runs finished (4 trained now)" in out


def test_module_tables_are_registered_under_their_names():
    assert all(name == table.name for name, table in paper_tables.TABLES.items())
