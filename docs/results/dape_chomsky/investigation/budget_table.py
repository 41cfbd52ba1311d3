"""The budget check's tables in notes.md: one task at 2000 steps (this page's runs) beside 8000.

Usage: python budget_table.py TASK   (reverse_string, missing_duplicate or parity_check)

Reads ../results.csv (the page's runs) and TASK_steps4/results.csv (the `poslab compare` report of
the same rows at 8000 steps) and prints one markdown row per encoding: the mean accuracy % at the
training lengths (id) and past them (ood), mean ± sample std over seeds, each seed in brackets; then
DAPE-Kerple minus each other row at both budgets, paired by seed, with its 95% interval and the
seeds DAPE-Kerple wins (`poslab.lab.report.stats`).
"""

import csv
import sys
from pathlib import Path

from poslab.lab.report.common import mean_std
from poslab.lab.report.stats import difference_cell, paired_difference

HERE = Path(__file__).resolve().parent
ROWS = {
    "nope": "NoPE",
    "rope": "RoPE",
    "kerple_log": "Kerple",
    "dape[base=kerple_log]": "DAPE-Kerple",
    "cope": "CoPE",
}


def page_values(task):
    """{(encoding, split): {seed: accuracy}} from the page's results.csv."""
    values = {}
    with open(HERE.parent / "results.csv") as f:
        for row in csv.DictReader(f):
            name, split = row["column"].split("/")
            if name == task and row["encoding"] in ROWS:
                values.setdefault((row["encoding"], split), {})[int(row["seed"])] = float(row["value"])
    return values


def longer_values(task):
    """The same from the 8000-step report."""
    values = {}
    with open(HERE / f"{task}_steps4" / "results.csv") as f:
        for row in csv.DictReader(f):
            for split in ("id", "ood"):
                seeds = values.setdefault((row["encoding"], split), {})
                seeds[int(row["seed"])] = float(row[f"{split}/accuracy"])
    return values


def cell(seeds):
    values = [seeds[k] for k in sorted(seeds)]
    stats = mean_std(values)
    spread = f" ± {stats['std']:.1f}" if stats["n"] > 1 else ""
    return f"{stats['mean']:.1f}{spread} ({', '.join(f'{v:.1f}' for v in values)})"


def main(task):
    before, after = page_values(task), longer_values(task)
    print("| row | id, 2000 steps | id, 8000 steps | ood, 2000 steps | ood, 8000 steps |")
    print("|---|---|---|---|---|")
    for encoding, name in ROWS.items():
        if (encoding, "id") in after:
            cells = [cell(d[(encoding, s)]) for s in ("id", "ood") for d in (before, after)]
            print(f"| {name} | {' | '.join(cells)} |")
    print()
    print("| DAPE-Kerple minus | id, 2000 steps | id, 8000 steps | ood, 2000 steps | ood, 8000 steps |")
    print("|---|---|---|---|---|")
    dape = "dape[base=kerple_log]"
    for encoding, name in ROWS.items():
        if encoding != dape and (encoding, "id") in after:
            cells = [
                difference_cell(paired_difference(d[(dape, s)], d[(encoding, s)], lower_is_better=False), 1)
                for s in ("id", "ood")
                for d in (before, after)
            ]
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
