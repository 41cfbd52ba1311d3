"""Experiments: grids of runs, their evaluation, their results pages and their subcommands.

- `poslab.lab.experiments.grid`: plan and train a grid of encodings x seeds (one worker per run);
- `poslab.lab.experiments.compare`: ``poslab compare`` / ``demo`` / ``report``, the runs' page
  (`poslab.lab.report.runs_page`);
- `poslab.lab.experiments.extrapolation`: ``poslab lm-extrapolation`` / ``extrapolate``, perplexity at
  L, 2L, 4L, ..., and its page, `poslab.lab.experiments.extrapolation_page`;
- `poslab.lab.experiments.head_stats`: ``poslab head-stats``, where trained heads look at each length;
- `poslab.lab.experiments.command`: subcommands as data (`Command`), which `poslab.lab.cli` offers.

A paper's experiment, its tables and its page, is a study (`poslab.lab.studies`), built on the grids
and the extrapolation scoring here.

A new kind of experiment is a module here (plan a grid with `plan_grid`, train it with
`train_grid`, evaluate, write its page with `poslab.lab.report.common`, declare its ``COMMANDS``), its
line in `COMMANDS` below, and its presets in `poslab.lab.presets` (see docs/harness.md).
"""

from poslab.lab.experiments import compare, extrapolation, head_stats
from poslab.lab.experiments.command import Command

# Every experiment's subcommands, in the order `poslab --help` lists them.
COMMANDS: tuple[Command, ...] = (
    *compare.COMMANDS,
    *extrapolation.COMMANDS,
    *head_stats.COMMANDS,
)
