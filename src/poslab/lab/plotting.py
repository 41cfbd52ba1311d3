"""Figures for reports, extrapolation curves and visualisations, in one place: matplotlib is imported
only here and only when something is drawn (it is the optional ``plot`` extra).

Figures are ``matplotlib.figure.Figure`` objects, not pyplot's: no global state, no backend to pick,
nothing to close. Reports skip their plots with a warning when matplotlib is missing
(``can_plot``); commands whose product is a plot raise instead (``figure``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("poslab")

MISSING = "matplotlib is not installed (pip install 'poslab[plot]')"


def can_plot(what: str) -> bool:
    """Whether matplotlib imports; if not, log that ``what`` is skipped and return False."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        log.warning("%s; skipping %s", MISSING, what)
        return False
    return True


def figure(**kwargs: Any) -> Any:
    """A new ``matplotlib.figure.Figure(**kwargs)``; ImportError naming the extra without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"plotting needs matplotlib: {MISSING}") from None
    return Figure(**kwargs)


def save(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Lay out and write a figure (creating its folder); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


LINE_STYLES = ("-", "--", ":", "-.")


def line_style(index: int) -> dict[str, str]:
    """The colour and line style of a figure's ``index``-th line: matplotlib's ten colours, then the
    same ten dashed, dotted and dash-dotted, so that up to 40 lines (every encoding of a table) are
    told apart; matplotlib's own cycle repeats its colours after ten."""
    return {"color": f"C{index % 10}", "linestyle": LINE_STYLES[index // 10 % len(LINE_STYLES)]}
