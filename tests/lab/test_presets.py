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
