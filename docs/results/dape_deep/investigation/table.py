"""The repeated-text probe of the deep Kerple and DAPE-Kerple language models, as Markdown tables
(`run.sh` writes them to repeated_text.md): per length, each seed's accuracy on the second copy, on
the same bytes read the first time, and the difference (what copying adds), then DAPE-Kerple minus
Kerple paired by seed; and, from heads/head_stats.json (`poslab head-stats`), each model's heads
summed up: how many are diffuse (more than half their attention beyond the training length at
8192), their mean entropy and far mass per length, and the same paired difference."""

from __future__ import annotations

import json
import re
from pathlib import Path

from poslab.lab.config import encoding_label, slug
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


def heads() -> None:
    """Per model: diffuse heads at 8192, mean entropy and far mass per length; DAPE-Kerple minus Kerple."""
    runs = json.loads((HERE / "heads" / "head_stats.json").read_text())
    stats: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        row = ROWS[slug(encoding_label(run["encoding"]))]  # the run folders' names
        for n, layers in run["lengths"].items():
            entropy = [e for layer in layers for e in layer["entropy"]]
            far = [f for layer in layers for f in layer["far_mass"]]
            stats.setdefault(f"mean entropy at {n} (nats)", {}).setdefault(row, {})[run["seed"]] = sum(
                entropy
            ) / len(entropy)
            if int(n) > run["train_len"]:
                stats.setdefault(f"mean far mass at {n}", {}).setdefault(row, {})[run["seed"]] = sum(
                    far
                ) / len(far)
            if n == "8192":
                stats.setdefault("diffuse heads at 8192 (far mass > 0.5)", {}).setdefault(row, {})[
                    run["seed"]
                ] = sum(f > 0.5 for f in far)
    n_heads = len([e for layer in runs[0]["lengths"]["128"] for e in layer["entropy"]])
    print(f"\nHeads ({n_heads} a model): per model, seeds in order; DAPE-Kerple minus Kerple paired by seed,")
    print("with DAPE-Kerple's wins (lower).\n")
    print("| statistic | Kerple | DAPE-Kerple | DAPE-Kerple - Kerple |")
    print("|---|---|---|---|")
    for name, rows in stats.items():
        cells = [
            " / ".join(f"{v:.3g}" for _, v in sorted(rows[r].items())) for r in ("Kerple", "DAPE-Kerple")
        ]
        diff = difference_cell(paired_difference(rows["DAPE-Kerple"], rows["Kerple"]), digits=2)
        print(f"| {name} | {cells[0]} | {cells[1]} | {diff} |")


if __name__ == "__main__":
    main()
    heads()
