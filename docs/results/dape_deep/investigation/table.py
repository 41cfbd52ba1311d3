"""The repeated-text probe of the deep Kerple and DAPE-Kerple language models, as a Markdown table
(`run.sh` writes it to repeated_text.md): per length, each seed's accuracy on the second copy, on
the same bytes read the first time, and the difference (what copying adds), then DAPE-Kerple minus
Kerple paired by seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from poslab.lab.report.stats import difference_cell, paired_difference

HERE = Path(__file__).resolve().parent
ROWS = {"kerple_log": "Kerple", "dape_base=kerple_log": "DAPE-Kerple"}


def load() -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """{row: {seed: {length: metrics}}} from repeated_text/<encoding>_seed<k>.json."""
    found: dict[str, dict[int, dict[str, dict[str, float]]]] = {row: {} for row in ROWS.values()}
    for path in sorted((HERE / "repeated_text").glob("*.json")):
        match = re.fullmatch(r"(.+)_seed(\d+)", path.stem)
        if match is None or match.group(1) not in ROWS:
            raise SystemExit(f"{path}: not <encoding>_seed<k>.json of {sorted(ROWS)}")
        metrics = json.loads(path.read_text())["metrics"]["lengths"]["by_length"]
        found[ROWS[match.group(1)]][int(match.group(2))] = metrics
    return found


def main() -> None:
    data = load()
    lengths = sorted({int(n) for seeds in data.values() for m in seeds.values() for n in m})
    seeds = sorted({s for v in data.values() for s in v})
    print("Per length: accuracy % on the second copy / on the same bytes read the first time / copy")
    print("gain (their difference), each seed; 16 held-out sequences a length, copy distance 1/2 to 3/4.\n")
    print("| length | row | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---|" + "---|" * len(seeds))
    for n in lengths:
        for row, runs in data.items():
            cells = []
            for _, lengths_of_run in sorted(runs.items()):
                m = lengths_of_run[str(n)]
                cells.append(f"{m['accuracy']:.1f} / {m['first_accuracy']:.1f} / {m['copy_gain']:+.1f}")
            print(f"| {n} | {row} | " + " | ".join(cells) + " |")
    print("\nDAPE-Kerple minus Kerple, paired by seed: mean [95% interval], DAPE-Kerple's wins (higher).\n")
    print("| length | copy gain | accuracy on the copy |")
    print("|---|---|---|")
    for n in lengths:
        cells = []
        for metric in ("copy_gain", "accuracy"):
            a = {s: m[str(n)][metric] for s, m in data["DAPE-Kerple"].items()}
            b = {s: m[str(n)][metric] for s, m in data["Kerple"].items()}
            cells.append(difference_cell(paired_difference(a, b, lower_is_better=False), digits=1))
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
