"""How much of DAPE's learned position term depends on the content (A) rather than on position (B).

Usage: python f_content.py RUN_DIR [RUN_DIR ...]   (runs of dape_ablation or dape_width)

For 8 validation windows (seed 0) of 128 tokens (the training length) and of 1024, every layer:
the position term P = final logits - A (B + f(A, B) for DAPE, f(B) or f(A, B) for the ablations,
B for a plain bias), centred within each query row (softmax ignores a row's constant). Its variance
splits into a part that is the same in every window (the mean over windows at each head, query and
key: position) and a part that changes with the window (content). Prints one markdown row per run,
length and layer: the content share of P's variance, P's and A's standard deviations.
"""

import sys

import torch

from poslab.runs import RunDir
from poslab.visualize import layer_logits

WINDOWS = 8


def centred(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """x (W, H, T, T) minus each query row's mean over its visible keys; zero where not visible."""
    x = x * visible
    mean = x.sum(-1, keepdim=True) / visible.sum(-1, keepdim=True)
    return (x - mean) * visible


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    print("| run | length | layer | content share of P's variance | std P | std A |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        loaded = RunDir(path).load_model()
        model, task = loaded.model, loaded.task
        for length in (128, 1024):
            windows = task.sample(
                WINDOWS, length, generator=torch.Generator().manual_seed(0), split="validation"
            )
            visible = torch.ones(length, length).tril().bool()
            n = visible.sum() * model.config.n_heads
            for layer in range(loaded.config.model.n_layers):
                lls = [layer_logits(model, x, layer=layer) for x in windows.inputs]
                p = centred(torch.stack([ll.logits - ll.scores for ll in lls]).double(), visible)
                a = centred(torch.stack([ll.scores for ll in lls]).double(), visible)
                position = p.mean(0)  # (H, T, T)
                content = ((p - position) ** 2).mean(0).sum() / n
                total = (p**2).mean(0).sum() / n
                share = (content / total).item() if total > 0 else float("nan")
                std_a = ((a**2).mean(0).sum() / n).sqrt().item()
                print(
                    f"| {path} | {length} | {layer} | {100 * share:.1f}% | {total.sqrt():.3f} | {std_a:.3f} |"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
