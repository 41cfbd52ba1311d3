"""The training loop: schedule, exact resume, non-finite stops, run directories, learning."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys

import pytest
import torch

import poslab.model
from poslab.kernels.native import cpu_model
from poslab.lab.checkpoint import CheckpointError, load_checkpoint
from poslab.lab.config import (
    EvalConfig,
    ModelSpec,
    RunConfig,
    TaskConfig,
    TrainConfig,
    valid_keys,
)
from poslab.lab.evaluate import eval_seed, evaluate
from poslab.lab.presets import get_preset, list_presets
from poslab.lab.progress import Progress, ProgressLogHandler, setup_logging
from poslab.lab.provenance import machine_record
from poslab.lab.rundir import RunDir, RunDirError
from poslab.lab.train import NonFiniteLossError, lr_at, train
from poslab.model import build_model


def tiny(**overrides) -> RunConfig:
    """The smoke preset, shortened: a few seconds per run."""
    base = {
        "train.steps": 12,
        "train.checkpoint_every": 4,
        "train.eval_every": 6,
        "train.log_every": 2,
    }
    return get_preset("smoke").override({**base, **overrides})


class Stop(Exception):
    """Raised from a callback to simulate a kill."""


def stop_at(step_to_stop: int):
    def callback(step, model):
        if step == step_to_stop:
            raise Stop

    return callback


pytestmark = pytest.mark.usefixtures("one_thread")


def records(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in lines]


# -- schedule --------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, config) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lr_at(100, config) == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way through the cosine
    short = TrainConfig(steps=5, lr=1e-3, warmup=100)  # warmup capped at the run length
    assert lr_at(4, short) == pytest.approx(1e-3)


# -- resume and determinism ------------------------------------------------------------------------


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    config = tiny(**{"model.dropout": 0.1})  # dropout: the torch RNG state must be restored too
    full = train(config, tmp_path / "full")

    with pytest.raises(Stop):  # killed two steps after the checkpoint at step 4
        train(config, tmp_path / "cut", callback=stop_at(6))
    assert RunDir(tmp_path / "cut").status() == "unfinished"
    assert load_checkpoint(tmp_path / "cut")["step"] == 4
    resumed = train(config, tmp_path / "cut", resume=True)

    assert resumed.metrics == full.metrics
    final = resumed.model.state_dict()
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert records(tmp_path / "cut") == records(tmp_path / "full")  # steps 5-6 not logged twice
    results = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert results["metrics"] == json.loads((tmp_path / "full" / "results.json").read_text())["metrics"]


def test_a_decoder_checkpointed_with_two_half_encodings_resumes_exactly(tmp_path, monkeypatch):
    # Before decoders dropped the encoder half, a decoder's CoPE table and Kerple parameters had two
    # halves, and so had their AdamW moments: the weights and the moments keep their first half.
    config = tiny(**{"model.encoding": "cope+kerple_log"})
    full = train(config, tmp_path / "full")
    build = poslab.model.build_encoding
    with monkeypatch.context() as patch:  # the layout before: both halves in every mode
        patch.setattr(poslab.model, "build_encoding", lambda *a, **k: build(*a, **{**k, "causal": None}))
        with pytest.raises(Stop):
            train(config, tmp_path / "cut", callback=stop_at(6))
    saved = load_checkpoint(tmp_path / "cut")
    assert saved["step"] == 4 and saved["model"]["encodings.0.parts.1.r1"].shape == (2, 2)
    resumed = train(config, tmp_path / "cut", resume=True)
    assert resumed.metrics == full.metrics
    final = resumed.model.state_dict()
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_resume_can_extend_a_finished_run(tmp_path):
    config = tiny()
    train(config, tmp_path / "run")
    longer = config.override({"train.steps": 16})
    result = train(longer, tmp_path / "run", resume=True)
    assert result.results["step"] == 16
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 16
    with pytest.raises(RunDirError, match="model.d_model"):
        train(config.override({"model.d_model": 64}), tmp_path / "run", resume=True)


def test_pool_and_counting_task_train(tmp_path):
    config = tiny(
        **{"task.name": "counting", "task.options": {"n_vars": 1}, "task.train_len": 6},
        **{"task.train_pool": 40, "train.steps": 4, "train.eval_every": 0},
    )
    result = train(config, None)
    assert set(result.metrics["splits"]) == {"id"}
    assert math.isfinite(result.metrics["splits"]["id"]["error"])


def test_encoder_task_reports_accuracy_per_length(tmp_path):
    config = tiny(
        **{"task.name": "reverse_string", "task.options": {"max_train_len": 6, "max_eval_len": 10}},
        **{"task.train_len": None, "eval.len_stride": 3, "train.steps": 4, "train.eval_every": 0},
    )
    result = train(config, tmp_path / "run")
    lengths = result.metrics["lengths"]
    assert list(lengths["id"]) == ["1", "4", "6"] and list(lengths["ood"]) == ["7", "10"]
    ood = [lengths["ood"][n]["accuracy"] for n in lengths["ood"]]
    assert result.metrics["splits"]["ood"]["accuracy"] == pytest.approx(sum(ood) / len(ood))
    assert result.results["headline"] == "accuracy"


def test_lengths_past_a_learned_table_score_nan_and_the_rest_still_run():
    config = tiny(
        **{"task.name": "reverse_string", "task.options": {"max_train_len": 6, "max_eval_len": 10}},
        **{"task.train_len": None, "eval.len_stride": 3, "train.steps": 2, "train.eval_every": 0},
        **{"model.encoding": "learned", "model.max_len": 12},  # input + output = 2 * length
    )
    lengths = train(config, None).metrics["lengths"]
    assert math.isfinite(lengths["id"]["6"]["error"])  # 12 positions: 0..11 fit
    assert math.isnan(lengths["ood"]["7"]["error"]) and math.isnan(lengths["ood"]["10"]["error"])


# -- failures --------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError) as info:
        train(tiny(), tmp_path / "run", callback=poison)
    message = str(info.value)
    assert "non-finite loss" in message and "step 6" in message
    assert str(tmp_path / "run" / "checkpoint.pt") in message and "\n" not in message
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in state["model"].values())
    assert RunDir(tmp_path / "run").status() == "unfinished"
    resumed = train(tiny(), tmp_path / "run", resume=True)  # the good checkpoint still resumes
    assert resumed.results["step"] == 12


def test_absurd_learning_rate_is_caught(tmp_path):
    config = tiny(**{"train.lr": 1e30, "train.warmup": 0, "train.grad_clip": 0.0})
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train(config, tmp_path / "run")


def test_finished_run_is_not_overwritten(tmp_path):
    train(tiny(), tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunDirError, match="already holds a finished run"):
        train(tiny(), tmp_path / "run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    train(tiny(**{"train.steps": 4}), tmp_path / "run", overwrite=True)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 4
    # where the run was made, for results pages built later on another machine
    assert results["machine"] == machine_record()
    assert results["machine"]["cpu"] == cpu_model() and results["machine"]["commit"]


def test_the_recorded_commit_is_the_one_at_the_start_of_the_run(tmp_path, monkeypatch):
    # A checkout moved while a run trains (a commit, a pull) must not relabel the code it ran.
    import poslab.lab.provenance as provenance
    import poslab.lab.train as train_module

    monkeypatch.setattr(train_module, "code_commit", lambda: "at-start")
    monkeypatch.setattr(provenance, "code_commit", lambda: "at-end")
    train(tiny(**{"train.steps": 2}), tmp_path / "run")
    machine = json.loads((tmp_path / "run" / "results.json").read_text())["machine"]
    assert machine["commit"] == "at-start"
    assert {k: v for k, v in machine.items() if k != "commit"} == {
        k: v for k, v in provenance.machine_record().items() if k != "commit"
    }


def test_corrupt_checkpoint_refuses_to_resume_and_is_left_alone(tmp_path):
    with pytest.raises(Stop):
        train(tiny(), tmp_path / "run", callback=stop_at(5))
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny(), tmp_path / "run", resume=True)
    assert path.read_bytes() == damaged


# -- learning --------------------------------------------------------------------------------------


def test_a_few_hundred_steps_learn_flipflop():
    config = tiny(
        **{"train.steps": 300, "train.warmup": 20, "train.eval_every": 0},
        **{"eval.batches": 4, "eval.batch_size": 32},
    )
    task = config.task.build()
    batch = task.sample(256, 8, generator=torch.Generator().manual_seed(123))

    def read_loss(model) -> float:
        with torch.no_grad():
            logits = model(batch.inputs)[batch.mask]
        return torch.nn.functional.cross_entropy(logits, batch.targets[batch.mask]).item()

    torch.manual_seed(config.train.seed)
    initial = read_loss(build_model(config.model_config(task)))  # the same init as the run
    result = train(config, None)
    trained = read_loss(result.model)
    assert initial > 1.4  # about ln 5: uniform over the 5 tokens
    assert trained < 0.45 < math.log(2)  # clearly better than guessing the bit
    assert result.metrics["splits"]["id"]["error"] < 30


# -- configs, presets, seeds, progress -------------------------------------------------------------


def test_every_preset_is_valid_and_overridable():
    for name in list_presets():
        config = get_preset(name)
        assert RunConfig.from_dict(json.loads(config.to_json())) == config
        assert config.override(["train.steps=7"]).train.steps == 7
    with pytest.raises(ValueError, match="unknown preset 'nope'.*smoke"):
        get_preset("nope")


def test_dotted_overrides_parse_and_validate():
    config = tiny()
    changed = config.override(
        [
            "model.encoding=dape[base=kerple_log]",
            "train.lr=1",
            "task.options.p=0.5",
            "eval.splits=id",
        ]
    )
    assert changed.model.encoding == "dape[base=kerple_log]"
    assert changed.train.lr == 1.0 and isinstance(changed.train.lr, float)
    assert changed.task.options == {"p": 0.5} and changed.eval.splits == ("id",)
    assert changed.encoding_label == "dape[base=kerple_log]"
    with pytest.raises(ValueError) as info:
        config.override(["train.stepz=3"])
    assert "'train.stepz'" in str(info.value) and "train.steps" in str(info.value)
    for bad, needle in [
        ("model.encoding=nosuch", "unknown encoding 'nosuch'"),
        ("task.name=nosuch", "unknown task 'nosuch'"),
        ("task.options.q=1", "unknown option(s) q"),
        ("train.batch_size=0", "train.batch_size must be"),
        ("eval.splits=id,bogus", "unknown eval split(s) bogus"),
        ("train.loss=everything", "train.loss must be one of"),
        ("model.d_model=31", "model.d_model (31) must be divisible"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            config.override([bad])
    assert "model.encoding_options.<key>" in valid_keys()


def test_sections_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig(10)  # positional arguments are refused
    config = TrainConfig()
    with pytest.raises(AttributeError):
        config.steps = 3
    spec = ModelSpec(d_model=64, encoding="cope")
    assert spec.to_model_config(vocab_size=5, n_outputs=None, causal=True).vocab_size == 5
    with pytest.raises(ValueError, match="task.train_len"):
        TaskConfig(name="flipflop")
    with pytest.raises(ValueError, match="leave task.train_len unset"):
        TaskConfig(name="parity_check", train_len=10)
    with pytest.raises(ValueError, match="eval.batches"):
        EvalConfig(batches=0)


def test_held_out_seeds_never_equal_training_seeds():
    seeds = {eval_seed(s, split, n) for s in (0, 1) for split in ("id", "ood") for n in (8, 64)}
    assert len(seeds) == 8 and min(seeds) >= 2**32
    with pytest.raises(ValueError, match="train.seed must be below"):
        TrainConfig(seed=2**32)


def test_progress_bar_is_silent_off_a_terminal_and_draws_on_one():
    quiet = io.StringIO()
    with Progress(10, stream=quiet) as bar:
        bar.update(5, loss=0.5)
    assert quiet.getvalue() == ""

    shown = io.StringIO()
    bar = Progress(10, desc="run", stream=shown, enabled=True, min_interval=0.0)
    handler = ProgressLogHandler(shown)
    logger = logging.getLogger("poslab.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    bar.update(4, loss=0.25)
    logger.warning("a log line")
    bar.update(6)
    bar.close()
    logger.removeHandler(handler)
    text = shown.getvalue()
    assert "run |" in text and "4/10" in text and "loss 0.25" in text and "10/10" in text
    cleared = text.index("a log line")  # the bar was wiped before the record, redrawn after
    assert text[:cleared].endswith("\r") and "10/10" in text[cleared:]
    assert text.endswith("\n")


def test_training_results_carry_the_declared_headline_and_per_length_splits(tmp_path):
    config = get_preset("chomsky_small").override(
        {"train.steps": 1, "train.device": "cpu", "eval.batches": 1, "task.options.max_eval_len": 42}
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result.results["headline"] == "accuracy"
    assert set(result.metrics["lengths"]) == {"id", "ood"}  # both splits range over lengths
    metrics = evaluate(result.model, config.task.build(), config.eval)
    assert "accuracy" in metrics["splits"]["ood"]


def test_a_schedule_trains_and_its_checkpoint_loads(tmp_path):
    config = tiny(**{"model.n_layers": 4, "model.encoding": "rope,rope,rope,nope"})
    train(config, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["encoding"] == [
        "rope",
        "rope",
        "rope",
        "nope",
    ]
    loaded = RunDir(tmp_path / "run").load_model()
    assert [loaded.model.encoding(i).name for i in range(4)] == ["rope", "rope", "rope", "nope"]
    assert loaded.config == config


def test_the_log_follows_stderr_when_it_is_replaced(monkeypatch):
    # A handler set up once (the CLI's) must not keep a stderr that was replaced and closed since,
    # e.g. by an earlier test's capture: the record goes to the stderr of the moment.
    gone = io.StringIO()
    monkeypatch.setattr(sys, "stderr", gone)
    setup_logging(False)
    gone.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("poslab").info("still shown")
    assert now.getvalue() == "still shown\n"
