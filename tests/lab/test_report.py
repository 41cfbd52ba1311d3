"""Reports: statistics over seeds, the Markdown table, CSV and JSON, plots."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import pytest

from poslab.lab.report import (
    RunRecord,
    load_runs,
    markdown_table,
    mean_std,
    summarize,
    write_report,
)
from poslab.lab.report.common import provenance_lines, stats_cell
from poslab.lab.report.stats import difference_cell, interval, paired_difference, t975


def record(label: str, seed: int, id_error: float, ood_error: float, **extra) -> RunRecord:
    results = {
        "task": "flipflop",
        "encoding": label,
        "seed": seed,
        "step": 10,
        "chance": 50.0,
        "headline": "error",
        "wall_time": 1.0,
        "metrics": {
            "splits": {
                "id": {"error": id_error, "seq_error": 2 * id_error},
                "ood_dense": {"error": ood_error, "seq_error": 2 * ood_error},
            },
            "lengths": {},
        },
        **extra,
    }
    return RunRecord(Path(f"/runs/{label}/seed{seed}"), "flipflop", label, seed, results)


def test_mean_and_sample_std_on_known_values():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    stats = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert stats["mean"] == 5.0 and stats["std"] == pytest.approx(math.sqrt(32 / 7))
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([1.0, float("nan"), None, 3.0]) == {"mean": 2.0, "std": math.sqrt(2), "n": 2}
    empty = mean_std([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_summary_groups_by_encoding_in_order_of_appearance():
    runs = [
        record("rope", 0, 10.0, 30.0),
        record("cope", 0, 0.0, 4.0),
        record("rope", 1, 20.0, 50.0),
        record("cope", 1, 2.0, 6.0),
        record("cope", 2, 1.0, 5.0),
    ]
    summary = summarize(runs)["flipflop"]
    assert list(summary) == ["rope", "cope"]
    assert summary["rope"]["n"] == 2 and summary["cope"]["seeds"] == [0, 1, 2]
    assert summary["rope"]["metrics"]["id/error"] == {"mean": 15.0, "std": math.sqrt(50), "n": 2}
    assert summary["cope"]["metrics"]["ood_dense/error"] == {"mean": 5.0, "std": 1.0, "n": 3}
    assert summary["cope"]["metrics"]["id/seq_error"]["mean"] == 2.0

    table = markdown_table(summarize(runs))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| encoding"))
    assert header.split(" | ")[1:4] == ["n", "id error %", "ood_dense error %"]
    assert "| rope | 2 | 15.00 ± 7.07 | 40.00 ± 14.14 |" in table
    assert "| cope | 3 | 1.00 ± 1.00 | 5.00 ± 1.00 |" in table
    assert "lower is better" in table and "chance 50% error" in table


def test_single_seed_cells_have_no_std():
    table = markdown_table(summarize([record("nope", 0, 12.345, 50.0)]))
    assert "| nope | 1 | 12.35 | 50.00 |" in table


def test_write_report_files_agree(tmp_path):
    runs = [record("rope", 0, 10.0, 30.0), record("rope", 1, 20.0, 50.0)]
    report = write_report(runs, tmp_path, plots=False)
    names = {p.name for p in report["files"]}
    assert names == {"table.md", "results.csv", "results.json"}
    assert (tmp_path / "table.md").read_text() == report["table"]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [float(r["id/error"]) for r in rows] == [10.0, 20.0]
    assert [r["seed"] for r in rows] == ["0", "1"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["flipflop"]["rope"]["metrics"]["ood_dense/error"]["mean"] == 40.0
    assert data["runs"][1]["metrics"]["id/error"] == 20.0


def test_per_length_results_give_a_lengths_csv_and_curve_summary(tmp_path):
    def chomsky(seed, accuracies):
        lengths = {"ood": {str(n): {"accuracy": a} for n, a in zip((41, 50), accuracies, strict=True)}}
        results = {
            "task": "parity_check",
            "encoding": "dape",
            "seed": seed,
            "headline": "accuracy",
            "chance": 50.0,
            "metrics": {
                "splits": {"ood": {"accuracy": sum(accuracies) / 2}},
                "lengths": lengths,
            },
        }
        return RunRecord(tmp_path / f"s{seed}", "parity_check", "dape", seed, results)

    runs = [chomsky(0, [60.0, 50.0]), chomsky(1, [80.0, 70.0])]
    summary = summarize(runs)["parity_check"]["dape"]
    assert summary["lengths"]["ood"]["41"]["accuracy"]["mean"] == 70.0
    assert summary["metrics"]["ood/accuracy"]["mean"] == 65.0
    report = write_report(runs, tmp_path / "out")
    names = {p.name for p in report["files"]}
    assert {"lengths.csv", "parity_check_splits.png", "parity_check_lengths.png"} <= names
    rows = list(csv.DictReader((tmp_path / "out" / "lengths.csv").open()))
    assert len(rows) == 4 and {r["length"] for r in rows} == {"41", "50"}
    assert "higher is better" in report["table"]


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    report = write_report([record("rope", 0, 1.0, 2.0), record("cope", 0, 0.0, 1.0)], tmp_path)
    png = tmp_path / "flipflop_splits.png"
    assert png in report["files"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_skips_plots_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("poslab").addHandler(handler)
    try:
        report = write_report([record("rope", 0, 1.0, 2.0)], tmp_path)
    finally:
        logging.getLogger("poslab").removeHandler(handler)
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "table.md").exists() and len(report["files"]) == 3
    assert any("matplotlib is not installed" in r.getMessage() for r in warnings)


def test_load_runs_finds_runs_below_a_directory(tmp_path):
    for label, seed in (("rope", 0), ("rope", 1)):
        run_dir = tmp_path / label / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(record(label, seed, 1.0, 2.0).results))
        (run_dir / "config.json").write_text("{}")
    write_report(load_runs([tmp_path]), tmp_path, plots=False)  # a report inside is not a run
    runs = load_runs([tmp_path])
    assert [(r.label, r.seed) for r in runs] == [("rope", 0), ("rope", 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no such run directory"):
        load_runs([tmp_path / "absent"])


def test_the_table_ends_with_a_reading_of_it():
    runs = [
        record("rope", 0, 10.0, 30.0),
        record("rope", 1, 20.0, 50.0),  # id 15 ± 7.07, ood 40 ± 14.14
        record("cope", 0, 0.0, 4.0),
        record("cope", 1, 2.0, 6.0),  # id 1 ± 1.41, ood 5 ± 1.41
        record("alibi", 0, 6.0, 90.0),
        record("alibi", 1, 6.0, 90.0),  # id 6 ± 0: within rope's 7.07 of cope? no: 5 > 1.41
    ]
    last = markdown_table(summarize(runs)).rstrip().splitlines()[-1]
    assert last.startswith("Reading, best error per split")
    assert "id: cope (worst rope, 15.00)" in last
    assert "ood_dense: cope (worst alibi, 90.00)" in last
    # a wide spread makes two rows level: rope's ood std 14.14 covers 40 - 30 = 10
    runs += [record("nope", 0, 1.5, 40.0), record("nope", 1, 1.5, 40.0)]
    last = markdown_table(summarize(runs)).rstrip().splitlines()[-1]
    assert "id: cope, nope (worst rope, 15.00)" in last
    table = markdown_table(summarize([record("nope", 0, 1.0, 2.0)]))
    assert "Reading" not in table


def test_the_reading_of_an_accuracy_table_takes_the_highest():
    runs = [record("rope", 0, 10.0, 30.0), record("cope", 0, 20.0, 60.0)]
    for r in runs:
        r.results["headline"] = "accuracy"
        splits = r.results["metrics"]["splits"]
        splits["ood"] = {"accuracy": splits.pop("ood_dense")["error"]}
        del splits["id"]
    last = markdown_table(summarize(runs)).rstrip().splitlines()[-1]
    assert last == (
        "Reading, best accuracy per split (level: within one sample std of the best mean): "
        "ood: cope (worst rope, 30.00)."
    )


def test_one_cell_format_for_every_page():
    assert stats_cell(None) == "–"
    assert stats_cell({"mean": math.nan, "std": math.nan, "n": 0}) == "–"
    assert stats_cell({"mean": 1.234, "std": 0.0, "n": 1}) == "1.23"
    assert stats_cell({"mean": 1.234, "std": 0.5, "n": 3}) == "1.23 ± 0.50"
    assert stats_cell({"mean": 12345.6, "std": 10.0, "n": 2}) == "12346 ± 10"
    assert stats_cell({"mean": None, "std": None, "n": 2}) == "inf"  # infinite, read back from JSON


def student_t_cdf_interval(q: float, df: int) -> float:
    """P(-q < T < q) for Student's t with ``df`` degrees of freedom, by Simpson's rule on the density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 20000
    h = 2 * q / n
    total = 0.0
    for i in range(n + 1):
        x = -q + i * h
        weight = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += weight * math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
    return total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30, 60])
def test_t_quantiles_hold_95_percent(df):
    assert student_t_cdf_interval(t975(df), df) == pytest.approx(0.95, abs=1e-3 if df <= 30 else 2e-3)


def test_paired_difference_interval_and_wins():
    a = {0: 3.0, 1: 4.0, 2: 5.0, 3: None}
    b = {0: 3.5, 1: 4.2, 2: 4.9, 4: 1.0}
    diff = paired_difference(a, b)
    assert diff["seeds"] == [0, 1, 2] and diff["n"] == 3 and diff["wins"] == 2
    mean = (-0.5 - 0.2 + 0.1) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in (-0.5, -0.2, 0.1)) / 2)
    assert diff["mean"] == pytest.approx(mean)
    assert diff["high"] - diff["mean"] == pytest.approx(4.303 * std / math.sqrt(3))
    assert paired_difference(a, b, lower_is_better=False)["wins"] == 1
    assert difference_cell(diff) == f"{mean:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}], 2/3"
    assert difference_cell(paired_difference({0: 1.0}, {0: 2.0})) == "-1.00, 1/1"
    assert difference_cell(paired_difference({0: 1.0}, {1: 2.0})) == "–"
    one = interval([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["low"])


def test_provenance_groups_runs_by_machine_record_and_names_what_was_not_recorded():
    new = {"cpu": "Intel Xeon", "isa": "x86-64-v4", "threads": 2, "torch": "2.13.0+cpu", "commit": "abc123"}
    old = {"cpu": "AMD EPYC", "threads": 1, "torch": "2.13.0+cpu"}  # before commit and isa were recorded
    runs = [("a", new), ("b", new), ("a", old), ("a", None)]
    lines = provenance_lines(runs, ["a", "b"])
    assert lines[0] == "| runs | parts | commit | CPU | instruction set | threads | torch |"
    assert lines[2] == "| 2 | all | abc123 | Intel Xeon | x86-64-v4 | 2 | 2.13.0+cpu |"
    assert lines[3] == "| 1 | a | not recorded | AMD EPYC | not recorded | 1 | 2.13.0+cpu |"
    assert lines[4] == "| 1 | a | " + " | ".join(["not recorded"] * 5) + " |"  # no record at all
    assert len(lines) == 5
