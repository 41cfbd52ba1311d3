"""Which counting programs a trained model gets wrong: error by the number of increments in the
program and by its length in tokens.

Usage: python errors_by_program.py RUN_DIR [RUN_DIR ...]   (runs of cope_counting)

Scores 2048 fresh programs (generator seed 1) at the run's training length and prints, per run, the
error and, for each number of ``++`` statements (any variable) and each 16-token length band, the
error % and the number of programs in it.
"""

import sys

import torch

from poslab.runs import RunDir


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    for path in paths:
        loaded = RunDir(path).load_model()
        model, task = loaded.model, loaded.task
        batch = task.sample(2048, loaded.config.task.train_len, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            wrong = ((model(batch.inputs).argmax(-1) != batch.targets) & batch.mask).any(-1)
        increments = (batch.inputs == task.tokens.index("++;")).sum(-1)
        tokens = (batch.inputs != 0).sum(-1)
        print(f"{path}: error {100 * wrong.float().mean():.2f}%")
        for name, key in (("increments", increments), ("tokens // 16", tokens // 16)):
            cells = [
                f"{v}: {100 * wrong[key == v].float().mean():.0f}% ({int((key == v).sum())})"
                for v in key.unique().tolist()
            ]
            print(f"  by {name}: " + ", ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
