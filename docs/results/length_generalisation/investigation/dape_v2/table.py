"""DAPE V2 (a 1x3 convolution over the heads' logits, `dape[kernel_size=3]`) against the benchmark's
DAPE (V1, the MLP) and the base bias alone, over ALiBi and over Kerple (log), from the recorded runs:
python docs/results/length_generalisation/investigation/dape_v2/table.py > .../dape_v2/table.md

V2's runs are read from ../data.jsonl (under dape_v2/), the benchmark's from ../../data.jsonl; every
run has the benchmark's preset, seeds 0-4. Differences are paired by seed."""

from __future__ import annotations

import json
from pathlib import Path

from poslab.lab.report.stats import difference_cell, interval, paired_difference

HERE = Path(__file__).parent
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
PARTS = {"passkey": "pass key", "repeated_text": "repeated text"}
# Per base: (V2, V1, the base alone), each (encoding spec, label).
BASES = {
    "ALiBi": (("dape[kernel_size=3]", "DAPE-V2-ALiBi"), ("dape", "DAPE-ALiBi"), ("alibi", "ALiBi")),
    "Kerple (log)": (
        ("dape[base=kerple_log,kernel_size=3]", "DAPE-V2-Kerple"),
        ("dape[base=kerple_log]", "DAPE-Kerple"),
        ("kerple_log", "Kerple (log)"),
    ),
}
LABELS = {spec: label for rows in BASES.values() for spec, label in rows}
Values = dict[tuple[str, str, str, int], dict[int, float]]  # (row, part, split, length) -> seed -> %


def load() -> Values:
    values: Values = {}
    sources = ((HERE.parent / "data.jsonl", "dape_v2/"), (HERE.parent.parent / "data.jsonl", ""))
    for path, prefix in sources:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if not record["run"].startswith(prefix) or record["encoding"] not in LABELS:
                continue
            part = record["run"][len(prefix) :].split("/")[0]
            for split, by_length in record["results"]["metrics"]["lengths"].items():
                for length, scores in by_length.items():
                    key = (LABELS[record["encoding"]], part, split, int(length))
                    values.setdefault(key, {})[record["seed"]] = scores["accuracy"]
    return values


def head() -> list[str]:
    return ["| row | " + " | ".join(str(n) for n in LENGTHS) + " |", "|---|" + "---|" * len(LENGTHS)]


def table(values: Values, part: str, split: str, rows: list[str]) -> list[str]:
    out = head()
    for row in rows:
        cells = []
        for n in LENGTHS:
            seeds = values.get((row, part, split, n), {})
            if not seeds:
                cells.append("–")
                continue
            stats = interval(list(seeds.values()))
            low, high = max(stats["low"], 0.0), min(stats["high"], 100.0)
            per_seed = " / ".join(f"{seeds[s]:.1f}" for s in sorted(seeds))
            cells.append(f"{per_seed}; **{stats['mean']:.1f}** [{low:.1f}, {high:.1f}]")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    values = load()
    out = []
    for base, rows in BASES.items():
        v2, v1, alone = (label for _, label in rows)
        if not any(key[0] == v2 for key in values):
            continue
        for part, title in PARTS.items():
            out += [f"## Over {base}: {title}", ""]
            out += ["Accuracy %: per seed (s0 / s1 / s2 / s3 / s4); the mean [95% interval].", ""]
            out += table(values, part, "by_length", [v2, v1, alone])
            out += ["", "Paired by seed: mean difference, 95% interval (cut to -100..+100), A's wins.", ""]
            out += ["| A minus B | " + " | ".join(str(n) for n in LENGTHS) + " |", head()[1]]
            for a, b in ((v2, v1), (v2, alone)):
                cells = []
                for n in LENGTHS:
                    ours, theirs = (values.get((r, part, "by_length", n), {}) for r in (a, b))
                    diff = paired_difference(ours, theirs, lower_is_better=False)
                    cells.append(difference_cell(diff, 1, span=100.0))
                out.append(f"| {a} minus {b} | " + " | ".join(cells) + " |")
            out.append("")
        for depth, where in ((100, "next to the question"), (0, "at the start of the sequence")):
            out += [f"## Over {base}: pass key with the key at depth {depth}% ({where})", ""]
            out += table(values, "passkey", f"depth_{depth}", [v2, v1, alone])
            out.append("")
    print("\n".join(out).rstrip("\n"))


if __name__ == "__main__":
    main()
