"""RunConfig and its parts: the model section mirrors ModelConfig; old config files load."""

from __future__ import annotations

import dataclasses

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
