"""The command line: listing, user errors (one line, exit 2), run directories, compare, eval."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import poslab
from poslab.lab import cli, experiments
from poslab.lab.cli import main
from poslab.lab.parsing import split_top_level
from poslab.lab.presets import list_presets
from poslab.lab.tasks import list_tasks

FAST = ["train.steps=6", "train.eval_every=0", "train.checkpoint_every=3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_list_prints_every_encoding_task_and_preset(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(poslab.list_encodings()) <= names
    assert set(list_tasks()) <= names and set(list_presets()) <= names
    code, out, _ = run(capsys, "list", "encodings")
    assert "cope" in out and "flipflop" not in out


def test_python_dash_m_poslab():
    proc = subprocess.run([sys.executable, "-m", "poslab", "list", "presets"], capture_output=True, text=True)
    assert proc.returncode == 0 and "flipflop_small" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--preset", "nosuch"], "unknown preset 'nosuch'"),
        (["train", "--preset", "smoke", "task.name=nosuch"], "unknown task 'nosuch'"),
        (["train", "--preset", "smoke", "model.encoding=nosuch"], "unknown encoding 'nosuch'"),
        (["train", "--preset", "smoke", "train.stepz=3"], "unknown option 'train.stepz'"),
        (
            ["train", "--preset", "smoke", "model.encoding_options.bogus=1"],
            "unknown option(s) bogus",
        ),
        (["train", "--preset", "smoke", "task.options.q=0.5"], "unknown option(s) q for task"),
        (["train", "--preset", "smoke", "steps"], "expected an option as key=value"),
        (["train", "model.encoding=rope"], "give --preset NAME"),
        (
            ["compare", "--preset", "smoke", "--encodings", "rope,nosuch"],
            "unknown encoding 'nosuch'",
        ),
        (["compare", "--preset", "smoke", "--encodings", "rope", "--seeds", "x"], "--seeds takes"),
        (["demo", "train.stepz=1"], "unknown option 'train.stepz'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, *argv, "--out", str(out_dir))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("poslab: error: ") and needle in err
    assert not out_dir.exists()  # nothing written


def test_unknown_option_lists_the_valid_ones(capsys, tmp_path):
    _, _, err = run(capsys, "train", "--preset", "smoke", "model.n_head=2", "--out", str(tmp_path))
    assert "'model.n_head'" in err and "model.n_heads" in err and "train.steps" in err


def test_finished_run_directory_is_refused_and_left_intact(capsys, tmp_path):
    out_dir = tmp_path / "run"
    assert run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out_dir))[0] == 0
    before = snapshot(out_dir)
    assert set(before) >= {"config.json", "metrics.jsonl", "checkpoint.pt", "results.json"}
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out_dir))
    assert code == 2 and err.count("\n") == 1 and "already holds a finished run" in err
    assert snapshot(out_dir) == before
    code, _, err = run(
        capsys, "train", "--preset", "smoke", "model.d_model=64", *FAST, "--out", str(out_dir),
        "--resume",
    )  # fmt: skip
    assert code == 2 and "different config" in err and "model.d_model" in err
    assert snapshot(out_dir) == before
    code, _, _ = run(
        capsys, "train", "--preset", "smoke", "train.steps=2", "--out", str(out_dir), "--overwrite"
    )
    assert code == 0 and json.loads((out_dir / "results.json").read_text())["step"] == 2


def test_resume_continues_a_run_to_more_steps(capsys, tmp_path):
    out_dir = tmp_path / "run"
    assert run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out_dir))[0] == 0
    code, out, _ = run(capsys, "train", "--out", str(out_dir), "--resume", "train.steps=9")
    assert code == 0 and "| rope | 1 |" in out
    assert json.loads((out_dir / "results.json").read_text())["step"] == 9


def test_corrupt_checkpoint_exits_2_and_is_not_touched(capsys, tmp_path):
    out_dir = tmp_path / "run"
    assert run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out_dir))[0] == 0
    (out_dir / "results.json").unlink()  # as if killed after its last checkpoint
    checkpoint = out_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-500])
    damaged = snapshot(out_dir)
    for argv in (
        ["train", "--preset", "smoke", *FAST, "--out", str(out_dir), "--resume"],
        ["eval", str(checkpoint)],
        ["eval", str(out_dir)],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "corrupt" in err, argv
    assert snapshot(out_dir) == damaged


def test_eval_reproduces_the_final_metrics(capsys, tmp_path):
    out_dir = tmp_path / "run"
    assert run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out_dir))[0] == 0
    code, out, _ = run(capsys, "eval", str(out_dir), "--json", str(tmp_path / "eval.json"))
    assert code == 0 and "| rope | 1 |" in out
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated == json.loads((out_dir / "results.json").read_text())["metrics"]
    code, _, err = run(capsys, "eval", str(out_dir), "train.steps=3")
    assert code == 2 and "only eval.*, train.device options" in err


def test_diverging_run_exits_1_with_one_line(capsys, tmp_path):
    argv = ["train", "--preset", "smoke", "train.lr=1e30", "train.warmup=0", "train.grad_clip=0"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 1 and err.strip().splitlines()[-1].startswith("poslab: error: non-finite")


def test_compare_writes_a_report_that_matches_the_runs(capsys, tmp_path):
    out_dir = tmp_path / "grid"
    encodings = "nope,dape[base=kerple_log,width=8]"
    code, out, _ = run(
        capsys, "compare", "--preset", "smoke", "--encodings", encodings, "--seeds", "0,1",
        "--out", str(out_dir), *FAST,
    )  # fmt: skip
    assert code == 0
    for name in ("table.md", "results.csv", "results.json", "flipflop_splits.png", "grid.json"):
        assert (out_dir / name).is_file(), name
    assert "wall time" in out and (out_dir / "table.md").read_text() in out

    run_dirs = sorted(p.parent for p in out_dir.rglob("results.json") if p.parent != out_dir)
    assert [p.relative_to(out_dir).as_posix() for p in run_dirs] == [
        "dape_base=kerple_log_width=8/seed0",
        "dape_base=kerple_log_width=8/seed1",
        "nope/seed0",
        "nope/seed1",
    ]
    truth = {}
    for run_dir in run_dirs:
        results = json.loads((run_dir / "results.json").read_text())
        truth[(results["encoding"], results["seed"])] = results["metrics"]["splits"]
    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    assert len(rows) == 4
    for row in rows:
        splits = truth[(row["encoding"], int(row["seed"]))]
        assert float(row["id/error"]) == splits["id"]["error"]
        assert float(row["ood_dense/error"]) == splits["ood_dense"]["error"]
    summary = json.loads((out_dir / "results.json").read_text())["summary"]["flipflop"]
    for label in ("nope", "dape[base=kerple_log,width=8]"):
        values = [truth[(label, seed)]["id"]["error"] for seed in (0, 1)]
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / 2**0.5
        assert summary[label]["metrics"]["id/error"]["mean"] == pytest.approx(mean)
        assert f"| {label} | 2 | {mean:.2f} ± {std:.2f} |" in out

    before = snapshot(out_dir)
    code, _, err = run(
        capsys,
        "compare",
        "--preset",
        "smoke",
        "--encodings",
        encodings,
        "--out",
        str(out_dir),
        *FAST,
    )
    assert code == 2 and "already holds a finished run" in err and snapshot(out_dir) == before
    code, out, _ = run(
        capsys, "compare", "--preset", "smoke", "--encodings", encodings, "--seeds", "0-1",
        "--out", str(out_dir), "--resume", *FAST,
    )  # fmt: skip
    assert code == 0 and "4 runs (0 trained)" in out


def test_report_remakes_the_table(capsys, tmp_path):
    grid = tmp_path / "grid"
    argv = ["compare", "--preset", "smoke", "--encodings", "rope", "--out", str(grid), "--no-plots"]
    assert run(capsys, *argv, *FAST)[0] == 0
    code, out, _ = run(capsys, "report", str(grid), "--out", str(tmp_path / "again"), "--no-plots")
    assert code == 0
    assert (tmp_path / "again" / "table.md").read_text() == (grid / "table.md").read_text()


def test_encoding_lists_split_outside_brackets():
    assert split_top_level("nope, rope,dape[base=fire,width=16],cope") == [
        "nope",
        "rope",
        "dape[base=fire,width=16]",
        "cope",
    ]


def test_compare_in_parallel_workers(capsys, tmp_path):
    out_dir = tmp_path / "grid"
    argv = ["compare", "--preset", "smoke", "--encodings", "nope,alibi", "--jobs", "2", "--no-plots"]
    code, out, _ = run(capsys, *argv, "--out", str(out_dir), *FAST)
    assert code == 0 and "2 runs (2 trained)" in out
    assert {p.parent.parent.name for p in out_dir.glob("*/seed0/results.json")} == {"nope", "alibi"}


def test_compare_resume_refuses_a_changed_grid_before_writing(capsys, tmp_path):
    out_dir = tmp_path / "grid"
    argv = ["compare", "--preset", "smoke", "--encodings", "rope", "--out", str(out_dir), "--no-plots"]
    assert run(capsys, *argv, *FAST)[0] == 0
    before = snapshot(out_dir)
    code, _, err = run(capsys, *argv, "--resume", *FAST, "model.d_model=64")
    assert code == 2 and "different config (model.d_model)" in err
    assert snapshot(out_dir) == before


def test_options_may_follow_flags(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--preset", "smoke", "--out", str(tmp_path / "r"), "train.stepz=1")
    assert code == 2 and "unknown option 'train.stepz'" in err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "smoke", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_compare_refuses_two_encodings_in_one_directory(capsys, tmp_path):
    code, _, err = run(
        capsys, "compare", "--preset", "smoke", "--encodings", "rope,rope", "--out", str(tmp_path / "g")
    )
    assert code == 2 and "map to the same directory" in err and not (tmp_path / "g").exists()


def test_the_command_line_offers_every_declared_command():
    names = [command.name for command in cli.COMMANDS]
    assert len(names) == len(set(names))
    assert {command.name for command in experiments.COMMANDS} <= set(names)
    assert {"study"} <= set(names)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    # each command's name and then its aliases (study: reproduce, lm-study)
    assert list(sub.choices) == [name for c in cli.COMMANDS for name in (c.name, *c.aliases)]
    assert {"reproduce", "lm-study"} <= set(sub.choices)


def test_eval_scores_a_byte_lm_on_a_probe_with_the_same_tokens(capsys, tmp_path):
    from dataclasses import replace

    from poslab.lab.evaluate import evaluate
    from poslab.lab.rundir import load_model
    from poslab.lab.tasks import build_task

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # enough documents for every split of the hash
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 12)
    source = [f"task.options.corpus_options.path={corpus}"]
    out_dir = tmp_path / "lm"
    argv = ["train", "--preset", "lm_stdlib_small", "task.options.corpus=files", *source, "model.d_model=16"]
    argv += ["model.n_layers=1", "model.n_heads=2", "train.batch_size=2", "eval.batches=1", *FAST]
    assert run(capsys, *argv, "--out", str(out_dir))[0] == 0

    probe = ["task.options.corpus=files", *source, "task.options.eval_lengths=16,32"]
    code, out, _ = run(capsys, "eval", str(out_dir), "--task", "repeated_text", *probe,
                       "--json", str(tmp_path / "probe.json"))  # fmt: skip
    assert code == 0 and "**repeated_text**" in out and "chance 0.39% accuracy" in out
    scored = json.loads((tmp_path / "probe.json").read_text())
    assert scored["task"] == "repeated_text" and scored["trained_on"] == "lm"
    assert sorted(scored["metrics"]["lengths"]["by_length"]) == ["16", "32"]
    # The same weights on the same probe, built by hand: the command changed nothing but the task.
    loaded = load_model(out_dir)
    task = build_task(
        "repeated_text", corpus="files", corpus_options={"path": str(corpus)}, eval_lengths="16,32"
    )
    direct = evaluate(loaded.model, task, replace(loaded.config.eval, splits=None), train_len=128)
    for split, values in direct["splits"].items():
        assert scored["metrics"]["splits"][split] == pytest.approx(values), split

    code, _, _ = run(capsys, "eval", str(out_dir), "--task", "repeated_text", *probe, "eval.splits=by_length",
                     "--json", str(tmp_path / "one.json"))  # fmt: skip
    assert code == 0 and list(json.loads((tmp_path / "one.json").read_text())["metrics"]["splits"]) == [
        "by_length"
    ]
    code, _, err = run(
        capsys, "eval", str(out_dir), "--task", "repeated_text", *probe, "eval.splits=validation"
    )
    assert code == 2 and "validation" in err and err.count("\n") == 1  # the LM's split, not the probe's
    code, _, err = run(capsys, "eval", str(out_dir), "task.options.gap=0.1")
    assert code == 2 and "only eval.*, train.device options" in err
    flipflop = tmp_path / "flipflop"
    assert run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(flipflop))[0] == 0
    code, _, err = run(capsys, "eval", str(flipflop), "--task", "repeated_text")
    assert code == 2 and err.count("\n") == 1 and "tokens differ" in err
