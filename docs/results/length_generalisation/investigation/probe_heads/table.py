"""The summary table of README.md, from the head_stats.json files beside it:
python docs/results/length_generalisation/investigation/probe_heads/table.py"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
LABELS = {"alibi": "ALiBi", "dape": "DAPE-ALiBi", "kerple_log": "Kerple (log)", "dape[base=kerple_log]": "DAPE-Kerple"}


def summary(record, length):
    heads = [
        (far, dist / length, ent)
        for layer in record["lengths"][str(length)]
        for far, dist, ent in zip(layer["far_mass"], layer["mean_distance"], layer["entropy"], strict=True)
    ]
    far_heads = [h for h in heads if h[0] > 0.5]
    where = statistics.mean(h[1] for h in far_heads) if far_heads else float("nan")
    entropy = statistics.mean(h[2] for h in far_heads) if far_heads else float("nan")
    pinned = sum(1 for h in far_heads if h[1] > 0.9)  # their attention on the sequence's first tokens
    return len(far_heads), pinned, statistics.mean(h[0] for h in heads), where, entropy


def main():
    print("| probe | model | seed | length | heads with far mass > 0.5 (of 8) | of them, mean distance > 0.9 T "
          "| mean far mass (8 heads) | far heads' mean distance / T | far heads' entropy (nats) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for probe, name in (
        ("pass key", "alibi_heads.json"),
        ("pass key", "alibi_heads_seed34.json"),
        ("pass key", "kerple_heads.json"),
        ("pass key", "kerple_heads_seed34.json"),
        ("repeated text", "repeated_text_alibi_heads.json"),
        ("repeated text", "repeated_text_alibi_heads_seed34.json"),
    ):
        for record in json.loads((HERE / name).read_text()):
            for length in (1024, 4096):
                n, pinned, mass, where, entropy = summary(record, length)
                print(f"| {probe} | {LABELS[record['encoding']]} | {record['seed']} | {length} | {n} | {pinned} | {mass:.2f} | "
                      f"{where:.2f} | {entropy:.2f} |")


if __name__ == "__main__":
    main()
