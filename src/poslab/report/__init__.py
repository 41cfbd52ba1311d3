"""Results pages: Markdown tables, CSV, JSON and plots, used by every experiment.

- `poslab.report.common`: mean ± std, table cells, CSV values, table.md + results.csv + results.json;
- `poslab.report.runs`: the page of finished training runs (``poslab train``, ``eval``, ``compare``,
  ``report``), re-exported here.

An experiment with a page of its own builds it in `poslab.experiments` from `poslab.report.common`
(e.g. `poslab.experiments.extrapolation_page`).
"""

from poslab.report.common import mean_std
from poslab.report.runs import (
    RunRecord,
    flat_metrics,
    lengths_csv,
    load_runs,
    markdown_table,
    runs_csv,
    summarize,
    table_columns,
    write_plots,
    write_report,
)

__all__ = [
    "RunRecord",
    "flat_metrics",
    "lengths_csv",
    "load_runs",
    "markdown_table",
    "mean_std",
    "runs_csv",
    "summarize",
    "table_columns",
    "write_plots",
    "write_report",
]
