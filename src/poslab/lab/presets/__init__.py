"""Named run configurations, one module per kind of experiment.

Every preset is a function returning a `RunConfig`; override any field on the command line
(``poslab train --preset flipflop_small model.encoding=cope train.steps=200``). Preset encodings
carry no options, so ``model.encoding`` can be swapped for any registered encoding.

- `poslab.lab.presets.synthetic`: flip-flop, selective copy, counting, the Chomsky hierarchy (and the
  demo's encodings);
- `poslab.lab.presets.language`: language models for length extrapolation (their evaluation lengths are in
  ``eval.extrapolate_to``);
- `poslab.lab.presets.probes`: the length-generalisation probes (pass key, MQAR, repeated text).

A new module of presets is imported here, once, so that its presets register.
"""

from poslab.lab.presets import language, probes, synthetic
from poslab.lab.presets.registry import DESCRIPTIONS, PRESETS, get_preset, list_presets, preset
from poslab.lab.presets.synthetic import DEMO_ENCODINGS

__all__ = [
    "DEMO_ENCODINGS",
    "DESCRIPTIONS",
    "PRESETS",
    "get_preset",
    "list_presets",
    "language",
    "preset",
    "probes",
    "synthetic",
]
