"""Issue 29's before/after table, built from the `poslab bench --out` files in this folder.

Each file is one fresh `poslab bench --sections attention,step` process: `{before,after,now}-{native,
x86-64-v3}-{tuned,untuned}.json`, one thread (before: the code when the issue was opened; after: its
first round of work; now: the second, with DAPE's kernel, PoPE's and Relative's paths; round3: the
third, masking without masked_fill, exp off its slow path, no zero-filled gradients, stick-breaking
and selective passes); "untuned" ran with POSLAB_NO_MALLOC_TUNING=1 (a library
user's process). Every ratio is measured against SDPA (attention) or RoPE's step in the same
process. A run on another CPU takes its own label (`run.sh intel tuned`) and becomes more columns.
Run: python docs/results/bench/issue29/table.py > docs/results/bench/issue29/table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
ATTENTION = ["alibi", "kerple_log", "kerple_power", "fire", "t5", "sandwich", "cope", "dape", "dape[kernel_size=3]"]
ATTENTION_TARGETS = {"cope": 1.6, "dape": 2.5, "dape[kernel_size=3]": 3.0}  # every bias: 1.5
STEP = ["alibi", "kerple_log", "kerple_power", "fire", "t5", "sandwich", "relative", "cope", "dape", "dape[base=kerple_log]", "fox", "cable", "selective",
        "pope", "stickbreaking"]  # fmt: skip
ARCHS, TUNINGS = ("native", "x86-64-v3"), ("tuned", "untuned")
ROUNDS = ("before", "after", "now", "round3")  # AMD EPYC; a later label (another CPU) follows them


def settings() -> list[tuple[str, str, str]]:
    """(label, arch, tuning) of every `run.sh` output here: the known rounds first, then any other
    label (say ``intel``, `run.sh intel tuned` on an Intel CPU) in alphabetical order."""
    found = set()
    for path in HERE.glob("*.json"):
        for arch in ARCHS:
            for tuning in TUNINGS:
                suffix = f"-{arch}-{tuning}"
                if path.stem.endswith(suffix) and path.stem != suffix[1:]:
                    found.add(path.stem[: -len(suffix)])
    labels = [w for w in ROUNDS if w in found] + sorted(found - set(ROUNDS))
    runs = [(w, a, t) for a in ARCHS for t in TUNINGS for w in labels]
    return [run for run in runs if (HERE / f"{'-'.join(run)}.json").exists()]


def ratios(path: Path) -> dict[str, Any]:
    tables = json.loads(path.read_text())
    attention = {r["attention"]: r["fwd+bwd / sdpa"] for r in tables[0]["rows"]}
    step = {r["encoding"]: r["step / rope"] for r in tables[1]["rows"]}
    machine = tables[0]["settings"]
    cpu = f"{machine.get('cpu')}, {machine.get('native_kernel')}"
    return {"attention": attention, "step": step, "cpu": cpu}


def main() -> None:
    runs = {s: ratios(HERE / f"{'-'.join(s)}.json") for s in settings()}
    columns = list(runs)
    head = "| | target | " + " | ".join(f"{w} {a} {t}" for w, a, t in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    out = ["Attention forward+backward / causal SDPA (same process):", "", head, rule]
    for name in ATTENTION:
        target = ATTENTION_TARGETS.get(name, 1.5)
        cells = [runs[c]["attention"].get(name) for c in columns]
        out.append(f"| {name} | <= {target} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    out += ["", "Training step / RoPE's step (same process):", "", head, rule]
    for name in STEP:
        cells = [runs[c]["step"].get(name) for c in columns]
        out.append(f"| {name} | <= 1.3 | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    out += ["", "The CPU and native kernel of each column:", ""]
    out += [f"- {w} {a} {t}: {runs[(w, a, t)]['cpu']}" for w, a, t in columns]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
