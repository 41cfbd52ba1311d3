"""The failure paths a new user hit: nothing lost, nothing silent (docs/reliability.md lists them)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from poslab.lab.cli import main

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


# -- 4. a full disk, a read-only directory, sizes past the memory: one line, exit 2 ---------------


def test_tests_run_where_chmod_does_not_stop_writes(tmp_path):
    """Why the tests below fake the faults at the write: as root a read-only mode does not stop it."""
    import os

    if os.geteuid() != 0:
        pytest.skip("not root: chmod would stop writes here")
    place = tmp_path / "ro"
    place.mkdir()
    place.chmod(0o500)
    (place / "x").write_text("written anyway")
    assert (place / "x").exists()


def fail_writes(monkeypatch, code: int, *, only: str = "") -> list[str]:
    """Make every file write whose name contains ``only`` fail with OSError ``code`` after writing
    part of the file (the disk filling up mid-write); returns the names that failed."""
    import errno
    import os

    from poslab.lab import checkpoint

    real = checkpoint._write_bytes
    failed = []

    def write(path, data):
        if only not in path.name:
            return real(path, data)
        failed.append(path.name)
        path.write_bytes(data[: len(data) // 2])
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    assert errno.errorcode[code]
    return failed


def test_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temporary_file(capsys, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    failed = fail_writes(monkeypatch, errno.ENOSPC, only="checkpoint.pt")
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out))
    assert failed and code == 2
    assert last_line(err) == (
        f"poslab: error: cannot write {out / 'checkpoint.pt'}: No space left on device; free some space, "
        "then run the command again (--resume continues a run)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "train.log"]  # no checkpoint, no .tmp


READ_ONLY_COMMANDS = {
    "train": ["train", "--preset", "smoke", *FAST],
    "compare": ["compare", "--preset", "smoke", "--encodings", "rope", *FAST],
    "bench": ["bench", "--quick"],
}


@pytest.mark.parametrize("command", sorted(READ_ONLY_COMMANDS))
def test_read_only_output_is_refused_before_the_work(capsys, tmp_path, monkeypatch, command):
    import errno

    import poslab.lab.bench
    import poslab.lab.train

    def no_work(*args, **kwargs):
        raise AssertionError("worked before checking the output")

    monkeypatch.setattr(poslab.lab.bench, "run_bench", no_work)
    monkeypatch.setattr(poslab.lab.train, "_loop", no_work)
    fail_writes(monkeypatch, errno.EROFS)
    out = tmp_path / "ro" / "out"
    argv = [*READ_ONLY_COMMANDS[command], "--out", str(out / "bench.json" if command == "bench" else out)]
    code, _, err = run(capsys, *argv)
    assert (
        code == 2
        and last_line(err).startswith("poslab: error: cannot write ")
        and "Read-only file system" in err
    )
    assert not (tmp_path / "ro").exists()


def test_read_only_report_and_eval_json_are_refused_before_the_work(
    capsys, tmp_path, monkeypatch, finished_run
):
    import errno

    import poslab.lab.cli
    import poslab.lab.report.runs_page

    def no_work(*args, **kwargs):
        raise AssertionError("worked before checking the output")

    monkeypatch.setattr(poslab.lab.report.runs_page, "load_runs", no_work)
    monkeypatch.setattr(poslab.lab.cli, "evaluate", no_work)
    fail_writes(monkeypatch, errno.EROFS)
    before = snapshot(finished_run)
    code, _, err = run(capsys, "report", str(finished_run), "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err
    code, _, err = run(capsys, "eval", str(finished_run), "--json", str(tmp_path / "e.json"))
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err
    assert snapshot(finished_run) == before and sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("eval.length=10000000", "length 10000000"),
        ("task.train_len=10000000", "task.train_len=10000000"),
        ("model.d_model=65536", "model.d_model=65536"),
        ("train.batch_size=10000000", "train.batch_size=10000000"),
    ],
)
def test_sizes_past_the_memory_are_refused_before_training(capsys, tmp_path, monkeypatch, option, named):
    import poslab.lab.memory
    import poslab.lab.train

    monkeypatch.setattr(poslab.lab.memory, "available_bytes", lambda device: 64 * 2**30)
    monkeypatch.setattr(poslab.lab.train, "_loop", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, option, "--out", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("poslab: error: out of memory: ") and named in err and "64.0 GiB free" in err
    assert not out.exists()


def test_the_memory_check_lets_ordinary_runs_through():
    import torch

    from poslab.lab.memory import check_fits, eval_bytes, training_bytes
    from poslab.lab.presets import get_preset

    for name in ("smoke", "flipflop_small", "counting_small"):
        config = get_preset(name)
        task = config.task.build()
        check_fits(config, task, torch.device("cpu"), eval_lengths=[config.task.train_len])
        assert 0 < training_bytes(config, task, 8) < 2**30 and 0 < eval_bytes(config, task, 8) < 2**30


def test_an_allocator_failure_is_one_line(capsys, tmp_path, monkeypatch):
    import poslab.lab.train

    def oom(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
            "tried to allocate 800000000000 bytes"
        )

    monkeypatch.setattr(poslab.lab.train, "_loop", oom)
    code, _, err = run(capsys, "-q", "train", "--preset", "smoke", *FAST, "--out", str(tmp_path / "run"))
    assert (
        code == 2
        and last_line(err).startswith("poslab: error: out of memory (")
        and "train.batch_size" in err
    )


# -- 5. work is saved before the final evaluation and on Ctrl-C ------------------------------------


def smoke_config(*overrides: str):
    from poslab.lab.presets import get_preset

    return get_preset("smoke").override([*FAST, *overrides])


def test_the_final_checkpoint_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
    import poslab.lab.train
    from poslab.lab.checkpoint import load_checkpoint

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(poslab.lab.train, "evaluate", failing_evaluation)
    config = smoke_config("train.checkpoint_every=0", "train.steps=3")
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        poslab.lab.train.train(config, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3


def test_ctrl_c_saves_a_checkpoint_at_the_step_it_lands_in(tmp_path):
    import os
    import signal

    from poslab.lab.checkpoint import load_checkpoint
    from poslab.lab.train import train

    def interrupt(step, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = smoke_config("train.checkpoint_every=0", "train.steps=30")
    # Python's own Ctrl-C handler, as in a terminal: pytest started in the background (nohup, `&`)
    # inherits SIGINT ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "run", progress=False, callback=interrupt)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    resumed = train(config, tmp_path / "run", resume=True, progress=False)
    uninterrupted = train(config, tmp_path / "other", progress=False)
    assert resumed.results["metrics"] == uninterrupted.results["metrics"]


def test_ctrl_c_on_the_command_line_saves_and_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from poslab.lab.checkpoint import load_checkpoint

    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "smoke",
        "train.steps=1000000",
        "train.checkpoint_every=0",
        "train.eval_every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "poslab", *argv, "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and last_line(err) == "poslab: interrupted; continue a run with --resume"
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 5


def test_time_a_run_spends_stopped_by_ctrl_z_is_not_in_its_wall_time(tmp_path):
    """SIGTSTP (Ctrl-Z, ``kill -TSTP``) pauses a run and the pause is left out of results.json's
    wall_time, so a page's compute is training time; SIGCONT resumes it."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(
        f"""
        import json, os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cli_failures import smoke_config
        from poslab.lab.train import train

        def pause(step, model):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTSTP)

        began = time.monotonic()
        run = {str(tmp_path / "run")!r}
        result = train(smoke_config("train.steps=6"), run, progress=False, callback=pause)
        print(json.dumps({{"total": time.monotonic() - began, "wall_time": result.results["wall_time"]}}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the run has stopped itself
    assert os.WIFSTOPPED(status), status
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    times = json.loads(out.strip().splitlines()[-1])
    assert times["wall_time"] > 0
    assert times["total"] - times["wall_time"] >= 1.9, times  # the 2 s stopped are not counted


# -- 6. temporary files of a killed process are removed --------------------------------------------


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_killed_writers_temporary_file_is_removed(capsys, tmp_path, finished_run, flag):
    import os

    out = copy_run(finished_run, tmp_path / "run")
    stale = out / f".checkpoint.pt.{dead_pid()}.tmp"
    stale.write_bytes(b"x" * 1000)
    alive = out / f".results.json.{os.getppid()}.tmp"  # another live process may be writing it
    alive.write_bytes(b"{")
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, "train.steps=6", "--out", str(out), flag)
    assert code == 0, err
    assert not stale.exists() and alive.exists()


# -- 7. silent wrong or empty output ---------------------------------------------------------------


def test_a_learned_table_shorter_than_the_evaluation_is_refused_before_training(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "smoke", *FAST, "model.encoding=learned", "model.max_len=12"]
    code, _, err = run(capsys, *argv, "task.train_len=4", "eval.length=8", "--out", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert "eval.length=8" in err and "15 tokens" in err and "max_len" in err
    assert not out.exists()
    code, _, err = run(capsys, *argv, "task.train_len=4", "eval.length=5", "--out", str(out))
    assert code == 0, err  # 9 tokens fit


def test_visualize_refuses_a_query_past_the_window(tmp_path):
    import torch

    from poslab.lab.visualize import CopeMap, plot_cope_positions, query_index

    assert query_index(-1, 128) == 127 and query_index(5, 128) == 5
    cmap = CopeMap(*(torch.zeros(1, 4, 4) for _ in range(3)), layer=0, npos_max=4, label="cope")
    with pytest.raises(
        ValueError, match=r"query must be a position in \[0, 4\) of the 4-token window.*100000"
    ):
        plot_cope_positions(cmap, tmp_path / "x.png", query=100000)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["sinusoidal", "learned"])
def test_attend_warns_of_an_encoding_that_acts_on_embeddings(name):
    import torch

    import poslab

    q = torch.randn(1, 2, 4, 8)
    encoding = poslab.build_encoding(name, n_heads=2, head_dim=8)
    with pytest.warns(UserWarning, match=f"encoding '{name}' acts on the token embeddings.*NoPE"):
        poslab.attend(q, q, q, encoding)
    model = poslab.build_model(
        poslab.ModelConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, encoding=name, max_len=16)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 5)  # the model applies it


# -- 8. the Python API's errors name the problem ---------------------------------------------------


def test_attend_with_no_queries_is_a_value_error():
    import torch

    import poslab

    empty = torch.randn(1, 2, 0, 8)
    with pytest.raises(ValueError, match="attend needs at least one query and one key, got T=0, S=0"):
        poslab.attend(empty, empty, empty, poslab.build_encoding("alibi", n_heads=2, head_dim=8))


def test_quiet_train_prints_no_info_lines(capsys, tmp_path):
    code, out, err = run(capsys, "-q", "train", "--preset", "smoke", *FAST, "--out", str(tmp_path / "run"))
    assert code == 0 and err == "" and "| rope | 1 |" in out
    assert "parameters, 4 steps" in (tmp_path / "run" / "train.log").read_text()  # the file keeps them


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_below_one_is_refused(capsys, tmp_path, jobs):
    out = tmp_path / "grid"
    code, _, err = run(
        capsys, "compare", "--preset", "smoke", "--encodings", "rope", "--jobs", jobs, "--out", str(out)
    )
    assert code == 2 and err == f"poslab: error: --jobs must be at least 1, got {jobs}\n"
    assert not out.exists()


def test_eval_refuses_a_checkpoint_that_disagrees_with_its_config(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    config["model"]["encoding"] = "alibi"
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", str(out))
    assert code == 2 and err.count("\n") == 1 and "model.encoding" in err and "config.json" in err


@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_dape_names_a_head_count_or_dtype_it_was_not_built_for(impl):
    import torch

    import poslab

    encoding = poslab.build_encoding("dape", n_heads=4, head_dim=8)
    two_heads = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="dape was built for n_heads=4, got queries with 2 heads"):
        poslab.attend(two_heads, two_heads, two_heads, encoding, impl=impl)
    half = torch.randn(1, 4, 6, 8).half()
    with pytest.raises(ValueError, match=r"dape's MLP is torch.float32 but the queries are torch.float16"):
        poslab.attend(half, half, half, encoding, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose
        q = torch.randn(1, 4, 6, 8).bfloat16()
        assert poslab.attend(q, q, q, encoding, impl=impl).shape == (1, 4, 6, 8)


# -- 9. grids show their progress, start the slowest runs first, and take --threads ----------------


def test_a_grid_logs_its_progress_and_starts_the_slowest_runs_first(capsys, tmp_path):
    out = tmp_path / "grid"
    argv = [
        "compare",
        "--preset",
        "smoke",
        "--encodings",
        "nope,cope",
        "--seeds",
        "0,1",
        *FAST,
        "--out",
        str(out),
    ]
    code, _, err = run(capsys, *argv, "--no-plots", "--no-progress")
    assert code == 0, err
    starts = [line for line in err.splitlines() if line.startswith("run ")]
    assert starts[0] == "run 1/4: cope seed 0" and starts[1].startswith("run 2/4: cope seed 1; about ")
    assert [s.split(":")[0] for s in starts] == ["run 1/4", "run 2/4", "run 3/4", "run 4/4"]
    assert "nope" in starts[2] and "left" in starts[3]
    assert "finished 4/4 runs" in err


def test_threads_sets_the_torch_threads_and_refuses_zero(capsys, tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, _, err = run(
        capsys, "-q", "train", "--preset", "smoke", *FAST, "--threads", "3", "--out", str(tmp_path / "a")
    )
    assert code == 0 and calls[0] == 3, err
    code, _, err = run(capsys, "train", "--preset", "smoke", "--threads", "0", "--out", str(tmp_path / "b"))
    assert code == 2 and err == "poslab: error: --threads must be at least 1, got 0\n"
    assert not (tmp_path / "b").exists()
    for command in (["demo"], ["lm-extrapolation", "--encodings", "rope"]):
        code, _, err = run(capsys, *command, "--threads", "-2", "--out", str(tmp_path / "c"))
        assert code == 2 and err == "poslab: error: --threads must be at least 1, got -2\n", command
    assert not (tmp_path / "c").exists()


# -- 10. the table says what its columns and rows mean, and which files it wrote -------------------


def test_the_compare_table_explains_its_columns_and_lists_its_files(capsys, tmp_path):
    out = tmp_path / "grid"
    argv = ["compare", "--preset", "smoke", "--encodings", "dape", *FAST, "--out", str(out), "--no-plots"]
    code, stdout, err = run(capsys, "-q", *argv)
    assert code == 0, err
    assert "- ood_sparse: far more 'ignore' instructions" in stdout and "- ood_dense: far fewer" in stdout
    assert "- seq error: % of sequences with at least one wrong scored token" in stdout
    assert "- dape: DAPE over its default base, alibi (dape[base=alibi])" in stdout
    assert stdout.rstrip().endswith(f"report in {out}: table.md, results.csv, results.json")
    assert "- dape: DAPE over" in (out / "table.md").read_text()


def test_a_run_set_aside_by_an_overwrite_is_not_reported(capsys, tmp_path, finished_run):
    """kill -9 between setting the old run aside and the new run's first checkpoint leaves it in
    .replaced/ (recoverable by hand); a report of the parent directory does not count it."""
    root = tmp_path / "runs"
    copy_run(finished_run, root / "rope")
    copy_run(finished_run, root / "rope" / ".replaced")
    code, out, err = run(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 0 and "| rope | 1 |" in out, err


def test_sigterm_to_a_grid_stops_its_workers_with_checkpoints_and_exits_130(tmp_path):
    """`kill PID` on a grid: its workers checkpoint and stop, no queued run starts, exit 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from poslab.lab.checkpoint import load_checkpoint

    out = tmp_path / "grid"
    # Three runs on two workers: the pool hands the third to a worker before either run ends.
    argv = ["compare", "--preset", "smoke", "--encodings", "nope,rope,alibi", "--jobs", "2"]
    argv += ["--out", str(out)]
    argv += ["train.steps=1000000", "train.checkpoint_every=0", "train.eval_every=0", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "poslab", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so that a failure can kill the workers too
    )
    every = [out / name / "seed0" for name in ("nope", "rope", "alibi")]

    def started() -> list:
        return [r for r in every if (r / "metrics.jsonl").exists()]

    deadline = time.monotonic() + 120
    while len(started()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    runs = started()
    assert len(runs) == 2
    proc.send_signal(signal.SIGTERM)  # to the grid's own process only, as `kill PID` does
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a worker trains on: fail without leaving it running
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, err
    for run in runs:  # each worker saved its step and stopped (no orphan trains on)
        step = load_checkpoint(run / "checkpoint.pt")["step"]
        assert step >= 1
        time.sleep(0.5)
        assert load_checkpoint(run / "checkpoint.pt")["step"] == step
    # ... and the run queued behind them was not started (it used to train on after the grid).
    assert started() == runs
    lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in lines and "spawn_main" not in "".join(
        line for line in lines.splitlines() if str(proc.pid) in line
    )


def test_a_failed_run_in_a_parallel_grid_starts_no_queued_run(tmp_path):
    """A run that fails stops the grid: the run it was already handed (the pool queues one more
    than it has workers) is not started, while the run still training beside it finishes."""
    from poslab.lab.experiments.grid import GridRun, train_grid
    from poslab.lab.presets import get_preset
    from poslab.lab.rundir import RunDir

    base = get_preset("smoke").override({"train.checkpoint_every": 0, "train.eval_every": 0})
    configs = {
        "slow": base.override({"model.encoding": "nope", "train.steps": 600}),
        # fails as training starts: learned positions cover fewer tokens than a sequence has
        "failing": base.override({"model.encoding": "learned", "model.max_len": 4, "train.steps": 400}),
        "queued": base.override({"model.encoding": "nope", "train.steps": 300}),
    }
    grid = [GridRun(config, RunDir(tmp_path / name)) for name, config in configs.items()]
    with pytest.raises(ValueError, match="past what the encoding covers"):
        train_grid(grid, resume=False, jobs=2, threads=1)
    assert (tmp_path / "slow" / "results.json").exists()
    assert not (tmp_path / "failing" / "metrics.jsonl").exists()
    assert not (tmp_path / "queued").exists()


# -- 8. a run directory written by one process at a time (issue #31) ------------------------------


def live_process():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_run_directory_another_process_writes_is_refused(capsys, tmp_path, finished_run, flag):
    out = copy_run(finished_run, tmp_path / "run")
    holder = live_process()
    try:
        (out / ".lock").write_text(f"{holder.pid}\n")
        before = snapshot(out)
        code, _, err = run(
            capsys, "train", "--preset", "smoke", *FAST, "train.steps=6", "--out", str(out), flag
        )
        assert code == 2 and err.count("\n") == 1, err
        assert str(out) in err and f"process {holder.pid}" in err, err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_grid_refuses_a_run_directory_another_process_writes(capsys, tmp_path, finished_run):
    root = tmp_path / "grid"
    copy_run(finished_run, root / "rope" / "seed0")
    holder = live_process()
    try:
        (root / "rope" / "seed0" / ".lock").write_text(f"{holder.pid}\n")
        code, _, err = run(
            capsys, "compare", "--preset", "smoke", "--encodings", "nope,rope", "--out", str(root),
            "--overwrite", "--no-plots", *FAST,
        )  # fmt: skip
        assert code == 2 and err.count("\n") == 1 and f"process {holder.pid}" in err, err
        assert not (root / "nope").exists()  # refused before anything trained
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_a_run_holds_its_lock_while_it_writes(tmp_path):
    import os

    from poslab.lab.presets import get_preset
    from poslab.lab.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{dead_pid()}\n")  # left by a process killed with kill -9
    config = get_preset("smoke").override([*FAST])
    seen = []
    train(config, out, progress=False, callback=lambda step, model: seen.append((out / ".lock").read_text()))
    assert seen and set(seen) == {f"{os.getpid()}\n"}
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))


def test_a_finished_run_is_reused_only_for_its_own_config(capsys, tmp_path):
    root = tmp_path / "grid"
    argv = ["compare", "--preset", "smoke", "--encodings", "nope", "--out", str(root), "--no-plots", *FAST]
    assert run(capsys, *argv)[0] == 0
    before = snapshot(root / "nope")
    code, _, err = run(capsys, *argv, "--resume", "train.steps=6")
    assert code == 2 and err.count("\n") == 1, err
    assert str(root / "nope" / "seed0") in err and "train.steps" in err, err
    assert snapshot(root / "nope") == before
    code, _, err = run(capsys, *argv, "--resume")  # the same config: reused
    assert code == 0, err


# -- 9. a signal ends a parallel grid at any moment, leaving no process behind (issue #31) --------


def start_grid(out, encodings="nope,rope,alibi"):
    import os
    import subprocess
    import sys

    argv = ["compare", "--preset", "smoke", "--encodings", encodings, "--jobs", "2", "--out", str(out)]
    argv += ["train.steps=1000000", "train.checkpoint_every=0", "train.eval_every=0", "--no-plots"]
    return subprocess.Popen(
        [sys.executable, "-m", "poslab", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group: every process it starts stays in it
    )


def group_left(pgid: int, seconds: float = 10.0) -> bool:
    """Whether a process of the group still runs ``seconds`` after the grid's process ended."""
    import os
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def end_grid(proc, *signals, gap=0.3, timeout=60):
    import os
    import signal
    import subprocess
    import time

    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap)
        proc.send_signal(sig)  # to the grid's own process only, as `kill PID` does
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = time.monotonic() - started
    left = group_left(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return err, took, left


@pytest.mark.parametrize("delay", [0.5])
def test_sigterm_while_a_grid_starts_its_workers_ends_it_and_leaves_no_process(tmp_path, delay):
    """A signal before the workers train (spawning, importing torch, idle): before, a worker died
    of it or lived on, orphaned, waiting for runs (with the resource tracker)."""
    import signal
    import time

    proc = start_grid(tmp_path / "grid")
    head = ""
    while "run 1/3" not in head and proc.poll() is None:  # the pool is spawning its workers
        head += proc.stderr.readline()
    time.sleep(delay)
    err, took, left = end_grid(proc, signal.SIGTERM)
    err = head + err
    assert proc.returncode == 130, err
    assert took < 30 and not left, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM", "SIGTERM"]])
def test_a_signal_to_a_training_grid_saves_checkpoints_and_leaves_no_process(tmp_path, signals):
    """SIGINT to the grid's process alone (``kill -INT``; Ctrl-C reaches the workers too) used to
    stop the grid and leave its workers training, orphaned; a second signal stops them at once."""
    import signal
    import time

    from poslab.lab.checkpoint import load_checkpoint

    out = tmp_path / "grid"
    proc = start_grid(out)
    every = [out / name / "seed0" for name in ("nope", "rope", "alibi")]
    deadline = time.monotonic() + 120
    while sum((r / "metrics.jsonl").exists() for r in every) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    runs = [r for r in every if (r / "metrics.jsonl").exists()]
    err, took, left = end_grid(proc, *(getattr(signal, name) for name in signals))
    assert proc.returncode == 130, err
    assert took < 30 and not left, err
    if len(signals) == 1:
        assert all(load_checkpoint(r / "checkpoint.pt")["step"] >= 1 for r in runs), err
    assert not any((r / ".lock").exists() and len(signals) == 1 for r in runs)


# -- 10. result and config files of the wrong shape name the file (issue #31) ---------------------


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '"x"',
        '{"task": "flipflop"}',
        '{"task": "flipflop", "encoding": "rope", "seed": 0, "metrics": "x"}',
        '{"task": "flipflop", "encoding": "rope", "seed": 0, "metrics": {"id": "x"}}',
    ],
)
def test_a_results_file_of_the_wrong_shape_is_one_line_naming_it(capsys, tmp_path, finished_run, content):
    run_dir = copy_run(finished_run, tmp_path / "runs" / "rope")
    (run_dir / "results.json").write_text(content)
    code, _, err = run(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 2 and err.count("\n") == 1 and str(run_dir / "results.json") in err, err


def test_a_foreign_results_file_under_a_report_is_one_line_naming_it(capsys, tmp_path, finished_run):
    copy_run(finished_run, tmp_path / "runs" / "rope")
    junk = tmp_path / "runs" / "junk"
    junk.mkdir()
    (junk / "results.json").write_text("[]")
    (junk / "config.json").write_text("[]")
    code, _, err = run(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 2 and err.count("\n") == 1 and str(junk) in err, err


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: [], "a JSON list"),
        (lambda r: {**r, "settings": "x"}, "'settings' is 'x'"),
        (lambda r: {**r, "runs": [{**r["runs"][0], "results": "x"}]}, "runs[0].results is 'x'"),
    ],
)
def test_an_extrapolation_results_file_of_the_wrong_shape_names_it(tmp_path, change, named):
    from poslab.lab.experiments.extrapolation_page import load_extrapolation_results

    good = {
        "settings": {"lengths": [8]},
        "runs": [{"encoding": "rope", "seed": 0, "results": {"8": {"ppl_last": 2.0}}}],
        "summary": {},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(good))
    assert load_extrapolation_results(path) == good
    path.write_text(json.dumps(change(good)))
    with pytest.raises(ValueError, match=rf"{path}.*{re.escape(named)}"):
        load_extrapolation_results(path)


# -- 11. messages: the file, the grammar, only flags the command has (issue #31) ------------------


def test_a_directory_with_an_unfinished_run_says_an(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "results.json").unlink()
    code, _, err = run(capsys, "train", "--preset", "smoke", *FAST, "--out", str(out))
    assert code == 2 and "already holds an unfinished run" in err, err


def test_report_on_a_full_disk_or_interrupted_names_no_resume(capsys, tmp_path, finished_run, monkeypatch):
    import errno

    from poslab.lab import checkpoint
    from poslab.lab.experiments import compare

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_bytes", full)
    code, _, err = run(capsys, "report", str(finished_run), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 2 and "No space left on device" in err and "--resume" not in err, err
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "write_report", interrupted)
    code, _, err = run(capsys, "report", str(finished_run), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 130 and err == "poslab: interrupted\n", err


def test_advice_names_only_flags_the_command_has():
    from types import SimpleNamespace

    from poslab.lab.cli import _advice

    message = "DIR already holds an unfinished run; pass --resume to continue it or --overwrite to replace it"
    assert _advice(message, SimpleNamespace(resume=True, overwrite=True)) == message
    assert (
        _advice(message, SimpleNamespace(no_resume=False))
        == "DIR already holds an unfinished run; use another --out"
    )
    full = "cannot write R/table.md: No space left on device; free some space, then run the command again"
    assert _advice(full + " (--resume continues a run)", SimpleNamespace()) == full


def test_threads_far_above_the_cores_warn(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads as they are
    code, _, err = run(
        capsys,
        "train",
        "--preset",
        "smoke",
        *FAST,
        "--threads",
        "4096",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    )
    assert code == 0 and "--threads 4096 is more than the" in err, err


def test_eval_json_to_a_directory_is_refused_before_the_evaluation(
    capsys, tmp_path, finished_run, monkeypatch
):
    from poslab.lab import cli

    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    code, _, err = run(capsys, "eval", str(finished_run), "--json", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and f"--json {tmp_path} is a directory" in err, err
