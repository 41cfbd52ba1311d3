"""Results pages: Markdown tables, CSV, JSON and plots, used by every experiment.

- `poslab.lab.report.common`: mean ± std, table cells, CSV values, table.md + results.csv + results.json;
- `poslab.lab.report.runs_page`: the page of finished training runs (``poslab train``, ``eval``, ``compare``,
  ``report``), re-exported here;
- `poslab.lab.report.datafile`: a folder's finished runs recorded in one append-only data file
  (``data.jsonl``), which pages are built from when the run folders are gone.

An experiment with a page of its own builds it in `poslab.lab.experiments` from `poslab.lab.report.common`
(e.g. `poslab.lab.experiments.extrapolation_page`).
"""

from poslab.lab.report.common import mean_std
from poslab.lab.report.runs_page import (
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
