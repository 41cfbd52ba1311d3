"""Experiments: grids of runs, their evaluation and their results pages.

- `poslab.experiments.grid`: plan and train a grid of encodings x seeds (one worker per run);
- `poslab.experiments.compare`: ``poslab compare`` / ``demo``, the runs' page (`poslab.report.runs`);
- `poslab.experiments.extrapolation`: ``poslab lm-extrapolation`` / ``extrapolate``, perplexity at
  L, 2L, 4L, ..., and its page, `poslab.experiments.extrapolation_page`.

A new kind of experiment is a module here (plan a grid with `plan_grid`, train it with
`train_grid`, evaluate, write its page with `poslab.report.common`), its presets in
`poslab.presets`, and a subcommand in `poslab.cli` (see docs/harness.md).
"""
