"""Issue 29's before/after table, built from the `poslab bench --out` files in this folder.

Each file is one fresh `poslab bench --sections attention,step` process: `{before,after,now}-{native,
x86-64-v3}-{tuned,untuned}.json`, one thread (before: the code when the issue was opened; after: its
first round of work; now: the second, with DAPE's kernel, PoPE's and Relative's paths; round3: the
third, masking without masked_fill, exp off its slow path, no zero-filled gradients, stick-breaking
and selective passes); "untuned" ran with POSLAB_NO_MALLOC_TUNING=1 (a library
user's process). Every ratio is measured against SDPA (attention) or RoPE's step in the same
process. Run: python docs/results/bench/issue29/table.py > docs/results/bench/issue29/table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
ATTENTION = ["alibi", "kerple_log", "kerple_power", "fire", "t5", "sandwich", "cope", "dape", "dape[kernel_size=3]"]
ATTENTION_TARGETS = {"cope": 1.6, "dape": 2.5, "dape[kernel_size=3]": 3.0}  # every bias: 1.5
STEP = ["alibi", "kerple_log", "kerple_power", "fire", "t5", "sandwich", "relative", "cope", "dape", "dape[base=kerple_log]", "fox", "cable", "selective",
        "pope", "stickbreaking"]  # fmt: skip
SETTINGS = [(when, arch, tuning) for arch in ("native", "x86-64-v3") for tuning in ("tuned", "untuned")
            for when in ("before", "after", "now", "round3")]  # fmt: skip


def ratios(path: Path) -> dict[str, dict[str, float]]:
    tables = json.loads(path.read_text())
    attention = {r["attention"]: r["fwd+bwd / sdpa"] for r in tables[0]["rows"]}
    step = {r["encoding"]: r["step / rope"] for r in tables[1]["rows"]}
    return {"attention": attention, "step": step}


def main() -> None:
    runs = {s: ratios(HERE / f"{s[0]}-{s[1]}-{s[2]}.json") for s in SETTINGS if (HERE / f"{'-'.join(s)}.json").exists()}
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
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
