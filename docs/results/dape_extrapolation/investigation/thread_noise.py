"""The thread-count noise floor of the DAPE pages: the same configuration trained twice, once with
one thread (this page's stdlib part) and once with two (dape_scale's x1, dape_width's stdlib).

Usage: python thread_noise.py   (from anywhere; reads the parts' results.json)

Pairs each run with its twin (same preset, encoding and seed; the width page's D = 32 row is
DAPE-ALiBi's default) and prints, per row and length, the two-thread run minus the one-thread run for
seeds 0, 1, 2, then the largest absolute difference per row over every length and seed.
"""

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2]
ONE_THREAD = RESULTS / "dape_extrapolation" / "stdlib" / "results.json"
# (page, part, its spec) -> the one-thread page's spec of the same configuration
TWINS = {
    ("dape_scale", "x1", "kerple_log"): "kerple_log",
    ("dape_scale", "x1", "dape[base=kerple_log]"): "dape[base=kerple_log]",
    ("dape_width", "stdlib", "alibi"): "alibi",
    ("dape_width", "stdlib", "dape[base=alibi,width=32]"): "dape[base=alibi]",
}


def scores(path: Path) -> dict[tuple[str, int, int], float]:
    """(encoding, seed, length) -> last-256 perplexity of a part's results.json."""
    result = json.loads(path.read_text())
    return {
        (run["encoding"], run["seed"], int(length)): cell["ppl_last"]
        for run in result["runs"]
        for length, cell in run["results"].items()
        if cell["status"] == "ok"
    }


def main() -> None:
    one = scores(ONE_THREAD)
    print("| row (two threads minus one) | length | seed 0 | seed 1 | seed 2 |")
    print("|---|---|---|---|---|")
    worst = {}
    for (page, part, spec), twin in TWINS.items():
        two = scores(RESULTS / page / part / "results.json")
        for length in sorted({n for _, _, n in two}):
            diffs = [two[spec, s, length] - one[twin, s, length] for s in (0, 1, 2)]
            relative = [100 * d / one[twin, s, length] for s, d in enumerate(diffs)]
            largest = max((abs(d), abs(r)) for d, r in zip(diffs, relative, strict=True))
            worst[spec] = max(worst.get(spec, (0.0, 0.0)), largest)
            cells = " | ".join(f"{d:+.4f}" for d in diffs)
            print(f"| {page}/{part} `{spec}` | {length} | {cells} |")
    print()
    for spec, (absolute, relative) in worst.items():
        print(f"{spec}: largest |difference| {absolute:.4f} ({relative:.2f}% of the value)")


if __name__ == "__main__":
    main()
