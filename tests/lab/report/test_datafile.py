"""A folder's data file (data.jsonl, curves.jsonl.gz): runs recorded and read back, append-only,
a torn last line or gzip member, a corrupt line, and pages of runs rebuilt from it alone."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poslab.lab.cli import main
from poslab.lab.presets import get_preset
from poslab.lab.report.datafile import CURVES, DATA, RecordedRunDir, StudyData, read_records, recorded_below
from poslab.lab.report.runs_page import load_runs, write_report
from poslab.lab.rundir import RunDir, RunDirError


def fake_run(folder: Path, encoding: str, seed: int, error: float) -> RunDir:
    """A finished run's files as training writes them, with a hand-made evaluation."""
    config = get_preset("smoke").override({"model.encoding": encoding, "train.seed": seed})
    run = RunDir(folder / encoding / f"seed{seed}")
    run.path.mkdir(parents=True)
    run.write_config(config)
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 0.7}) + "\n" + json.dumps({"step": 2, "loss": float("nan")}) + "\n"
    )
    metrics = {"splits": {"id": {"error": error, "seq_error": 2 * error}, "ood": {"error": 3 * error}}}
    machine = {"cpu": "hand", "isa": "x86-64-v3", "threads": 1, "torch": "2", "commit": "abc123"}
    run.write_results(
        {"task": "flipflop", "encoding": encoding, "seed": seed, "step": 2, "n_params": 10,
         "wall_time": 1.5, "machine": machine, "chance": 50.0, "headline": "error", "metrics": metrics}
    )  # fmt: skip
    return run


@pytest.fixture(autouse=True)
def poslab_log(caplog):
    """The ``poslab`` log into ``caplog``, and as it was after each test (`main` sends it to the
    stderr of its test, which is closed for the next)."""
    log = logging.getLogger("poslab")
    saved = log.handlers[:], log.level, log.propagate
    log.addHandler(caplog.handler)
    yield
    log.handlers, log.level, log.propagate = saved


@pytest.fixture
def grid(tmp_path) -> Path:
    """A folder of four finished runs (two encodings x two seeds) at ``<part>/<encoding>/seed<k>``."""
    for i, (encoding, seed) in enumerate([("nope", 0), ("nope", 1), ("rope", 0), ("rope", 1)]):
        fake_run(tmp_path / "out" / "part", encoding, seed, error=10.0 + i)
    return tmp_path / "out"


def test_runs_recorded_read_back_as_their_folders_hold_them(grid):
    data = StudyData(grid)
    assert data.runs == {} and not (grid / DATA).exists()
    added = data.record_runs([grid / "part"])
    assert added == ["part/nope/seed0", "part/nope/seed1", "part/rope/seed0", "part/rope/seed1"]
    again = StudyData(grid)  # read from the file
    for key in added:
        run = RunDir(grid / key)
        record = again.runs[key]
        assert record["config"] == json.loads((run / "config.json").read_text())
        assert record["results"] == json.loads((run / "results.json").read_text())
        assert (record["part"], record["encoding"], record["seed"]) == (
            "part",
            key.split("/")[1],
            run.load_config().train.seed,
        )
        assert record["commit"] == "abc123" and record["machine"] == {
            "cpu": "hand",
            "isa": "x86-64-v3",
            "threads": 1,
            "torch": "2",
        }
        recorded = again.run_dir(run.path)
        assert isinstance(recorded, RecordedRunDir) and recorded.is_finished()
        assert recorded.load_results() == run.load_results() and recorded.load_config() == run.load_config()
    # the curves: every *.jsonl of the folder, record by record (NaN as null, as strict JSON has it)
    curves = again.curves()
    assert set(curves) == set(added)
    assert curves["part/rope/seed1"] == {
        "metrics.jsonl": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": None}]
    }
    assert not again.run_dir(grid / "part" / "alibi" / "seed0").is_finished()


def test_the_file_is_only_ever_appended_to(grid):
    data = StudyData(grid)
    data.record_runs([grid / "part"])
    before, curves = (grid / DATA).read_bytes(), (grid / CURVES).read_bytes()
    assert StudyData(grid).record_runs([grid / "part"]) == []  # a second page build appends nothing
    assert (grid / DATA).read_bytes() == before and (grid / CURVES).read_bytes() == curves
    fake_run(grid / "part", "alibi", 0, error=1.0)
    assert StudyData(grid).record_runs([grid / "part"]) == ["part/alibi/seed0"]
    after = (grid / DATA).read_bytes()
    assert after.startswith(before) and after[len(before) :].count(b"\n") == 1
    assert (grid / CURVES).read_bytes().startswith(curves)  # a new gzip member
    assert len(StudyData(grid).curves()) == 5


def test_a_recorded_run_is_never_recorded_again_even_when_its_folder_changes(grid, caplog):
    StudyData(grid).record_runs([grid / "part"])
    before = (grid / DATA).read_bytes()
    run = RunDir(grid / "part" / "rope" / "seed0")
    results = run.load_results()
    run.write_results({**results, "wall_time": 99.0})
    with caplog.at_level(logging.WARNING, logger="poslab"):
        assert StudyData(grid).record_runs([grid / "part"]) == []
    assert "differs from its record" in caplog.text and f"{DATA}:3" in caplog.text
    assert (grid / DATA).read_bytes() == before
    assert StudyData(grid).get(run.path)["results"]["wall_time"] == 1.5


def test_a_torn_last_line_is_ignored_with_a_warning_and_cut_off_by_the_next_append(grid, caplog):
    StudyData(grid).record_runs([grid / "part"])
    whole = (grid / DATA).read_bytes()
    lines = whole.splitlines(keepends=True)
    (grid / DATA).write_bytes(b"".join(lines[:3]) + lines[3][:40])  # a crash in the last write
    with caplog.at_level(logging.WARNING, logger="poslab"):
        data = StudyData(grid)
    assert f"{DATA}:4 is a partial line" in caplog.text
    assert len(data.runs) == 3 and "part/rope/seed1" not in data.runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="poslab"):
        assert data.record_runs([grid / "part"]) == ["part/rope/seed1"]
    assert "ends in a partial line" in caplog.text
    assert (grid / DATA).read_bytes() == whole  # the three whole lines as they were, the fourth again


def test_a_torn_curves_member_is_ignored_and_cut_off(grid, caplog):
    StudyData(grid).record_runs([grid / "part"])
    whole = (grid / CURVES).read_bytes()
    (grid / CURVES).write_bytes(whole + gzip.compress(b'{"run": "x", "files": {}}\n', mtime=0)[:15])
    with caplog.at_level(logging.WARNING, logger="poslab"):
        assert len(StudyData(grid).curves()) == 4
    assert "partial gzip member" in caplog.text
    fake_run(grid / "part", "alibi", 0, error=1.0)
    StudyData(grid).record_runs([grid / "part"])
    assert (grid / CURVES).read_bytes().startswith(whole) and len(StudyData(grid).curves()) == 5
    (grid / CURVES).write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"curves.jsonl.gz is not a gzip file from byte 0 on"):
        StudyData(grid).curves()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json\n", "is not a record of a data file (Expecting property name"),
        (b"[1, 2]\n", "is not a record of a data file (kind 'list'"),
        (b'{"kind": "run", "run": "a/b/seed0"}\n', "is not a run record (no 'config', 'results')"),
        (b'{"kind": "run", "run": "a/b/seed0", "config": {}, "results": {}}\n', "is not a run's results"),
        (b'{"kind": "scores"}\n', "is not a record of a data file (kind 'scores', not 'run' or 'scoring')"),
    ],
)
def test_a_corrupt_line_is_an_error_naming_the_file_and_line(grid, line, reason, capsys):
    StudyData(grid).record_runs([grid / "part"])
    lines = (grid / DATA).read_bytes().splitlines(keepends=True)
    (grid / DATA).write_bytes(b"".join([lines[0], line, *lines[1:]]))
    with pytest.raises(ValueError, match=re.escape(f"{DATA}:2 {reason}")):
        read_records(grid / DATA)
    # the command line: one line, exit 2, and nothing written
    before = (grid / DATA).read_bytes()
    capsys.readouterr()  # what recording printed (the log, when an earlier test set it up)
    assert main(["report", str(grid / "part"), "--out", str(grid / "page")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poslab: error: ") and f"{DATA}:2" in err and err.count("\n") == 1
    assert (grid / DATA).read_bytes() == before and not (grid / "page").exists()


def test_a_recorded_run_of_another_config_is_refused_naming_the_key(grid):
    data = StudyData(grid)
    data.record_runs([grid / "part"])
    run = grid / "part" / "rope" / "seed0"
    same = RunDir(run).load_config()
    data.check_reusable(run, same.override(["train.device=cpu"]))  # where it trained: reusable
    with pytest.raises(
        RunDirError, match=rf"{DATA}:3 records part/rope/seed0 with a different config \(train.lr\)"
    ):
        data.check_reusable(run, same.override(["train.lr=0.5"]))
    data.check_reusable(grid / "part" / "alibi" / "seed0", same.override(["train.lr=0.5"]))  # not recorded


def test_a_page_of_runs_rebuilds_from_the_data_file_alone(grid, capsys):
    """`poslab record` then `poslab report` with the folders gone: the same table.md, results.csv,
    results.json, in the order the runs were given."""
    part = grid / "part"
    paths = [str(part / "rope"), str(part / "nope")]
    write_report(load_runs(paths), grid / "folders", plots=False)
    assert main(["record", str(grid)]) == 0
    assert "4 run(s) recorded" in capsys.readouterr().out
    assert main(["record", str(grid)]) == 0
    assert "0 run(s) recorded" in capsys.readouterr().out
    shutil.rmtree(part)
    assert [run for run, _ in recorded_below(part / "rope")] == [
        part / "rope" / "seed0",
        part / "rope" / "seed1",
    ]
    write_report(load_runs(paths), grid / "data", plots=False)
    for name in ("table.md", "results.csv", "results.json"):
        assert (grid / "data" / name).read_bytes() == (grid / "folders" / name).read_bytes()
    assert "rope/seed0" in (grid / "data" / "results.csv").read_text()
    with pytest.raises(ValueError, match="no such run directory"):
        load_runs([part / "alibi"])
    assert main(["record", str(tmp := grid / "folders")]) == 2
    assert f"no finished run folders (config.json and results.json) below {tmp}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("page", ["cope_flipflop", "dape_width", "demo"])
def test_committed_pages_rebuild_from_their_data_files_alone(page):
    """docs/results/check_data.py on a task table, an LM study and a compare grid: the committed
    page and files, byte for byte, from the data file without the run folders."""
    pytest.importorskip("matplotlib")
    script = Path(__file__).parents[3] / "docs" / "results" / "check_data.py"
    done = subprocess.run([sys.executable, str(script), page], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"docs/results/{page}: `poslab ") and " identical; " in done.stdout
