"""Intervals and paired comparisons over seeds, for the readings a results page makes.

With three to five seeds a mean ± std says little about whether two rows differ: a page that
compares rows A and B shows the paired difference over the seeds both have, its 95% interval
(Student's t with n - 1 degrees of freedom) and how many seeds A wins, e.g. ``-0.32 [-0.84, +0.20],
3/3``. A difference whose interval holds 0 is not a finding, whatever its wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from poslab.lab.report.common import finite, mean_std

# Two-sided 95% quantiles of Student's t (the 0.975 quantile) for 1..30 degrees of freedom; the
# tests check each against a numerical integral of the t density.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom (normal's beyond 30,
    where the two differ by less than 2%)."""
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def interval(values: list[float | None]) -> dict[str, float]:
    """`mean_std` plus the 95% interval of the mean (``low``, ``high``; NaN for fewer than 2)."""
    stats = mean_std(values)
    n = stats["n"]
    half = t975(n - 1) * stats["std"] / math.sqrt(n) if n > 1 else float("nan")
    return {**stats, "low": stats["mean"] - half, "high": stats["mean"] + half}


def paired_difference(
    a: Mapping[Any, float | None], b: Mapping[Any, float | None], *, lower_is_better: bool = True
) -> dict[str, Any]:
    """A minus B over the seeds (keys) where both are finite: mean, 95% interval, n, and ``wins``,
    the seeds on which A is better (lower, or higher with ``lower_is_better=False``)."""
    seeds = sorted(s for s in a.keys() & b.keys() if finite(a[s]) and finite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]  # type: ignore[operator]
    wins = sum(1 for d in diffs if (d < 0 if lower_is_better else d > 0))
    return {**interval(diffs), "wins": wins, "seeds": seeds}


def difference_cell(diff: Mapping[str, Any], digits: int = 2, span: float | None = None) -> str:
    """``-0.32 [-0.84, +0.20], 3/3``: the mean paired difference, its interval and A's seed wins;
    '–' without a common seed, no interval for one. ``span``: the most two values can differ (100
    for percentages); the interval is cut to -span..+span (`runs_past`)."""
    n = diff["n"]
    if n == 0:
        return "–"
    text = f"{diff['mean']:+.{digits}f}"
    if n > 1:
        low, high = diff["low"], diff["high"]
        if span is not None:
            low, high = max(low, -span), min(high, span)
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"{text}, {diff['wins']}/{n}"


def runs_past(diff: Mapping[str, Any], span: float | None) -> bool:
    """Whether the interval of ``diff`` reaches past -span..+span (so `difference_cell` cuts it)."""
    return span is not None and diff["n"] > 1 and (diff["low"] < -span or diff["high"] > span)
