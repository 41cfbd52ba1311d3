"""RunConfig and its parts: the model section mirrors ModelConfig; old config files load."""

from __future__ import annotations

import dataclasses
import json

from poslab.lab.config import TASK_GIVEN, ModelSpec, RunConfig
from poslab.lab.presets import get_preset
from poslab.model import ModelConfig


def test_model_spec_has_every_model_config_field_but_the_tasks():
    spec = {f.name: f for f in dataclasses.fields(ModelSpec)}
    full = [f for f in dataclasses.fields(ModelConfig) if f.name not in TASK_GIVEN]
    assert list(spec) == [f.name for f in full]  # same order: config.json keeps its key order
    for f in full:
        mine = spec[f.name]
        assert mine.type == f.type, f.name
        assert mine.default == f.default and mine.default_factory == f.default_factory, f.name


def test_a_config_json_without_the_new_eval_key_still_loads():
    data = get_preset("smoke").to_dict()
    del data["eval"]["extrapolate_to"]
    assert RunConfig.from_dict(data) == get_preset("smoke")


def test_a_per_layer_schedule_from_the_command_line_round_trips():
    """model.encoding=rope,rope,rope,nope (commas inside [...] belong to a spec) is a schedule, kept
    as a tuple, saved as a JSON list, labelled by its specs."""
    config = get_preset("smoke").override(
        [
            "model.n_layers=4",
            "model.encoding=rope[scaling=yarn,factor=4],rope,rope,nope",
            "model.encoding_options.base=500",
        ]
    )
    assert config.model.encoding == ("rope[scaling=yarn,factor=4]", "rope", "rope", "nope")
    assert json.loads(config.to_json())["model"]["encoding"] == list(config.model.encoding)
    assert RunConfig.from_dict(json.loads(config.to_json())) == config
    assert config.encoding_label == "rope[scaling=yarn,factor=4,base=500],rope[base=500],rope[base=500],nope"
    assert "model.encoding" in config.diff(get_preset("smoke"))
    model_config = config.model_config(config.task.build())
    assert model_config.schedule == config.model.encoding
    assert ModelSpec(encoding=["rope", "nope"]).encoding == ("rope", "nope")
