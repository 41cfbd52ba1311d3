"""The failure paths a new user hit: nothing lost, nothing silent (docs/reliability.md lists them)."""

from __future__ import annotations

import json
import shutil

import pytest

from poslab.cli import main

FAST = ["train.steps=4", "train.eval_every=0", "train.checkpoint_every=2", "eval.batches=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished smoke run (4 steps, seed 0), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["-q", "train", "--preset", "smoke", *FAST, "--out", str(out), "--no-progress"]) == 0
    return out


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


# -- 1. a report pools only runs that differ in the seed alone -------------------------------------


def test_report_refuses_a_repeated_seed(capsys, tmp_path, finished_run):
    copy_run(finished_run, tmp_path / "a")
    copy_run(finished_run, tmp_path / "b")
    code, _, err = run(
        capsys, "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")
    )
    assert code == 2 and err.count("\n") == 1 and "seed 0" in err and "twice" in err
    assert not (tmp_path / "r").exists()


def test_report_keeps_runs_of_different_configs_apart_and_says_so(capsys, tmp_path, finished_run):
    copy_run(finished_run, tmp_path / "short")
    longer = copy_run(finished_run, tmp_path / "long")
    config = json.loads((longer / "config.json").read_text())
    config["train"]["steps"] = 8
    (longer / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "report", str(tmp_path / "short"), str(longer), "--out", str(tmp_path / "r"))
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| rope")]
    assert rows == [line for line in rows if "| 1 |" in line] and len(rows) == 2, out
    assert "train.steps=4" in out and "train.steps=8" in out and "differ" in out


# -- 2. --overwrite removes the old run only once the new one can replace it ----------------------


def test_overwrite_keeps_the_old_run_when_the_new_one_diverges_at_once(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    bad = ["train.lr=1e30", "train.warmup=0", "train.grad_clip=0"]
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, *bad, "--out", str(out), "--overwrite")
    assert code == 1 and last_line(err).startswith("poslab: error: non-finite loss"), err
    assert snapshot(out) == before


def test_overwrite_keeps_the_old_run_when_the_corpus_is_empty(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(out)
    code, _, err = run(
        capsys, "train", "--preset", "lm_stdlib_small", "task.options.corpus=files",
        f"task.options.corpus_options.path={empty}", "--out", str(out), "--overwrite",
    )  # fmt: skip
    assert code == 2 and last_line(err).startswith("poslab: error: corpus 'files': no file matches"), err
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_once_it_has_a_checkpoint(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    code, _, _ = run(
        capsys, "train", "--preset", "smoke", *FAST, "train.steps=2", "--out", str(out), "--overwrite"
    )
    assert code == 0 and json.loads((out / "results.json").read_text())["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "checkpoint.pt", "results.json", "train.log"]
    )


# -- 3. --resume continues the run from its own config ---------------------------------------------


def test_resume_with_the_preset_continues_the_saved_run(capsys, tmp_path):
    out = tmp_path / "cope_s1"
    argv = ["train", "--preset", "smoke", *FAST, "--no-progress"]
    assert run(capsys, *argv, "model.encoding=alibi", "train.seed=1", "--out", str(out))[0] == 0
    code, stdout, err = run(
        capsys, "train", "--preset", "smoke", "--out", str(out), "--resume", "train.steps=6"
    )
    assert code == 0, err
    assert "| alibi | 1 |" in stdout
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["seed"], results["encoding"]) == (6, 1, "alibi")


def test_resume_refuses_options_that_contradict_the_run(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--preset", "smoke", "--out", str(out), "--resume", "train.seed=2")
    assert code == 2 and err.count("\n") == 1 and "train.seed" in err
    code, _, err = run(
        capsys, "train", "--preset", "flipflop_small", "--out", str(out), "--resume", "model.d_model=64"
    )
    assert code == 2 and err.count("\n") == 1 and "model.d_model" in err
    code, _, err = run(capsys, "train", "--preset", "counting_small", "--out", str(out), "--resume")
    assert code == 2 and err.count("\n") == 1 and "task" in err and "counting_small" in err
    assert snapshot(out) == before


def test_resume_of_a_directory_without_a_run_is_refused(capsys, tmp_path):
    out = tmp_path / "typo"
    code, _, err = run(capsys, "train", "--preset", "smoke", "--out", str(out), "--resume")
    assert code == 2 and err.count("\n") == 1 and "no run to continue" in err
    assert not out.exists()
