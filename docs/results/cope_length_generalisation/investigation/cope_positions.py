"""Where CoPE's contextual positions fall at the training length (128) and past it (up to 320).

Usage: python cope_positions.py RUN_DIR [RUN_DIR ...]   (runs of cope_length_generalisation)

For 4 validation windows of 320 tokens (seed 0), every layer: the mean gate, the share of
(query, key) pairs whose position reaches the clamp (npos_max - 1, the table's last row), and the
position's median and 90th percentile, separately for queries inside the training length (0-127)
and past it (128-319). Prints one markdown row per run and layer.
"""

import sys

import torch

from poslab.runs import RunDir
from poslab.visualize import cope_map


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    print("| run | layer | queries | mean gate | at the clamp | p median / 90% |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        loaded = RunDir(path).load_model()
        model, task = loaded.model, loaded.task
        windows = task.sample(4, 320, generator=torch.Generator().manual_seed(0), split="validation")
        with torch.no_grad():
            for layer in range(loaded.config.model.n_layers):
                maps = [cope_map(model, x, layer=layer) for x in windows.inputs]
                positions = torch.stack([m.positions for m in maps])  # (B, H, T, T)
                gates = torch.stack([m.gates for m in maps])
                clamp = maps[0].npos_max - 1
                i = torch.arange(320)[:, None]
                j = torch.arange(320)[None, :]
                for lo, hi in ((0, 128), (128, 320)):
                    pairs = (j <= i) & (i >= lo) & (i < hi)
                    p, g = positions[..., pairs], gates[..., pairs]
                    at_clamp = (p >= clamp - 1e-6).float().mean()
                    print(
                        f"| {path} | {layer} | {lo}-{hi - 1} | {g.mean():.2f} | {100 * at_clamp:.1f}% "
                        f"| {p.quantile(0.5):.1f} / {p.quantile(0.9):.1f} |"
                    )


if __name__ == "__main__":
    main(sys.argv[1:])
