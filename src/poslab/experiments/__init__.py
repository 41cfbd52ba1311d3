"""Experiments: grids of runs, their evaluation, their results pages and their subcommands.

- `poslab.experiments.grid`: plan and train a grid of encodings x seeds (one worker per run);
- `poslab.experiments.compare`: ``poslab compare`` / ``demo`` / ``report``, the runs' page
  (`poslab.report.runs`);
- `poslab.experiments.extrapolation`: ``poslab lm-extrapolation`` / ``extrapolate``, perplexity at
  L, 2L, 4L, ..., and its page, `poslab.experiments.extrapolation_page`;
- `poslab.experiments.reproduce`: ``poslab reproduce TABLE``, the papers' tables
  (`poslab.experiments.paper_tables`) trained part by part and written as pages;
- `poslab.experiments.lm_study`: ``poslab lm-study NAME``, the DAPE paper's language-model studies
  (`poslab.experiments.lm_studies`), each a set of ``lm-extrapolation`` grids and one page
  (`poslab.experiments.lm_study_page`);
- `poslab.experiments.command`: subcommands as data (`Command`), which `poslab.cli` offers.

A new kind of experiment is a module here (plan a grid with `plan_grid`, train it with
`train_grid`, evaluate, write its page with `poslab.report.common`, declare its ``COMMANDS``), its
line in `COMMANDS` below, and its presets in `poslab.presets` (see docs/harness.md).
"""

from poslab.experiments import compare, extrapolation, lm_study, reproduce
from poslab.experiments.command import Command

# Every experiment's subcommands, in the order `poslab --help` lists them.
COMMANDS: tuple[Command, ...] = (
    *compare.COMMANDS,
    *extrapolation.COMMANDS,
    *lm_study.COMMANDS,
    *reproduce.COMMANDS,
)
