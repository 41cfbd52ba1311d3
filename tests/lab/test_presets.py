"""The presets: every LM preset declares its evaluation lengths."""

from __future__ import annotations

import pytest

from poslab.lab.config import EvalConfig
from poslab.lab.presets import get_preset, list_presets


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


def test_probe_presets_share_one_model_optimiser_and_grid():
    configs = {name: get_preset(f"{name}_small") for name in ("passkey", "mqar", "repeated_text")}
    for name, config in configs.items():
        task = config.task.build()
        assert task.name == name and config.task.train_len == 128
        assert task.split_lengths("by_length") == (128, 256, 512, 1024, 2048, 4096)
        assert config.model.max_len >= 4096
    first, *rest = configs.values()
    for config in rest:  # calibrated once, for every probe and encoding alike (steps: per probe)
        assert (config.model, config.eval) == (first.model, first.eval)
        assert config.override({"train.steps": first.train.steps}).train == first.train
