"""The harness's single homes: the run directory, the model section of a config, the tasks'
declarations, the presets' evaluation lengths and the shared page pieces."""

from __future__ import annotations

import dataclasses
import math

import pytest

from poslab import cli, experiments
from poslab.config import TASK_GIVEN, EvalConfig, ModelSpec, RunConfig
from poslab.evaluate import evaluate
from poslab.experiments.grid import plan_grid
from poslab.model import ModelConfig
from poslab.options import parse_int_list, parse_seeds, split_list, split_top_level
from poslab.presets import get_preset, list_presets
from poslab.report.common import stats_cell
from poslab.runs import CHECKPOINT, CONFIG, RESULTS, RunDir, RunDirError, find_trained_runs
from poslab.tasks import TASKS, build_task
from poslab.train import train


def test_model_spec_has_every_model_config_field_but_the_tasks():
    spec = {f.name: f for f in dataclasses.fields(ModelSpec)}
    full = [f for f in dataclasses.fields(ModelConfig) if f.name not in TASK_GIVEN]
    assert list(spec) == [f.name for f in full]  # same order: config.json keeps its key order
    for f in full:
        mine = spec[f.name]
        assert mine.type == f.type, f.name
        assert mine.default == f.default and mine.default_factory == f.default_factory, f.name


def test_every_task_declares_its_headline_and_split_lengths():
    for name in TASKS.names():
        if name == "lm":
            continue  # needs a corpus; covered by tests/test_extrapolate.py
        task = build_task(name)
        assert task.headline in ("error", "accuracy"), name
        for split, params in task.splits().items():
            lengths = task.split_lengths(split)
            assert (lengths is None) == ("lengths" not in params), (name, split)
    assert build_task("reverse_string").headline == "accuracy"
    assert build_task("flipflop").headline == "error"


def test_training_results_carry_the_declared_headline_and_per_length_splits(tmp_path):
    config = get_preset("chomsky_small").override(
        {"train.steps": 1, "train.device": "cpu", "eval.batches": 1, "task.options.max_eval_len": 42}
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result.results["headline"] == "accuracy"
    assert set(result.metrics["lengths"]) == {"id", "ood"}  # both splits range over lengths
    metrics = evaluate(result.model, config.task.build(), config.eval)
    assert "accuracy" in metrics["splits"]["ood"]


def test_lm_presets_carry_their_evaluation_lengths():
    tops = {name: get_preset(name).eval.extrapolate_to for name in list_presets() if name.startswith("lm_")}
    assert tops == {
        "lm_stdlib_small": 4096,
        "lm_stdlib_x4": 4096,
        "lm_stdlib_x16": 4096,
        "lm_paper_128": 8192,
        "lm_paper_512": 8192,
    }
    assert get_preset("smoke").eval.extrapolate_to is None
    with pytest.raises(ValueError, match="eval.extrapolate_to"):
        EvalConfig(extrapolate_to=0)


def test_a_config_json_without_the_new_eval_key_still_loads():
    data = get_preset("smoke").to_dict()
    del data["eval"]["extrapolate_to"]
    assert RunConfig.from_dict(data) == get_preset("smoke")


def test_run_dir_owns_status_files_and_loading(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.status() == "empty" and not run.is_finished()
    config = get_preset("smoke").override({"train.steps": 2, "train.device": "cpu", "eval.batches": 1})
    train(config, run.path, progress=False)
    assert run.status() == "finished" and run.is_finished() and run.has_checkpoint()
    assert {CONFIG, RESULTS, CHECKPOINT} <= {p.name for p in run.path.iterdir()}
    assert run.load_config() == config
    assert run.load_results()["step"] == 2 and run.train_wall_time() > 0
    loaded = run.load_model()
    assert loaded.step == 2 and loaded.label == "rope" and not loaded.model.training
    assert find_trained_runs([tmp_path]) == [run.path]
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run.check(resume=False, overwrite=False)
    run.clear()
    assert run.status() == "empty"


def test_grid_places_runs_and_refuses_clashes(tmp_path):
    base = get_preset("smoke")
    grid = plan_grid(base, ["nope", "dape[base=alibi]"], [0, 1], tmp_path, resume=False, overwrite=False)
    assert [str(run.path.relative_to(tmp_path)) for run in grid] == [
        "nope/seed0",
        "nope/seed1",
        "dape_base=alibi/seed0",
        "dape_base=alibi/seed1",
    ]
    assert grid[3].config.train.seed == 1 and grid[2].config.model.encoding == "dape[base=alibi]"
    with pytest.raises(ValueError, match="same directory"):
        plan_grid(base, ["rope", "rope"], [0], tmp_path, resume=False, overwrite=False)


def test_option_parsers():
    assert split_list(" a, b,,c ") == ["a", "b", "c"]
    assert split_top_level("rope,dape[base=fire,width=16]") == ["rope", "dape[base=fire,width=16]"]
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("3,1,3") == [3, 1]
    with pytest.raises(ValueError, match="--seeds takes integers"):
        parse_seeds("a")
    with pytest.raises(ValueError, match="--layers takes integers such as 0,1"):
        parse_int_list("0,x", "--layers", "0,1")


def test_one_cell_format_for_every_page():
    assert stats_cell(None) == "–"
    assert stats_cell({"mean": math.nan, "std": math.nan, "n": 0}) == "–"
    assert stats_cell({"mean": 1.234, "std": 0.0, "n": 1}) == "1.23"
    assert stats_cell({"mean": 1.234, "std": 0.5, "n": 3}) == "1.23 ± 0.50"
    assert stats_cell({"mean": 12345.6, "std": 10.0, "n": 2}) == "12346 ± 10"
    assert stats_cell({"mean": None, "std": None, "n": 2}) == "inf"  # infinite, read back from JSON


def test_the_command_line_offers_every_declared_command():
    names = [command.name for command in cli.COMMANDS]
    assert len(names) == len(set(names))
    assert {command.name for command in experiments.COMMANDS} <= set(names)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == names
