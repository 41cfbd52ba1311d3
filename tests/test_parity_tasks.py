"""The tasks against the reference implementations that produced the papers' numbers.

- Flip-flop: Liu et al.'s definition (arXiv 2306.00946): the first instruction writes, the last
  reads, the ones in between are i.i.d. (ignore with probability p, write or read otherwise).
- Chomsky tasks: DeepMind's code (google-deepmind/neural_networks_chomsky_hierarchy and
  google-deepmind/randomized_positional_encodings): task keys, input and output sizes, output
  lengths, odds_first's order and the per-token accuracy pooled over a batch.
- Counting: the official CoPE run (facebookresearch/RAM, projects/cope): programs of up to 512
  statements whose last 512 tokens are kept.

Each expectation below is restated from the reference's code or paper, not computed by poslab.
"""

from __future__ import annotations

import pytest
import torch

from poslab.tasks import Batch, build_task


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequence(task, batch: Batch, b: int) -> list[str]:
    """A causal task's token sequence: the first input, then every target."""
    return task.decode(torch.cat([batch.inputs[b, :1], batch.targets[b]])).split(" ")


# -- flip-flop -------------------------------------------------------------------------------------


def read_answers(words: list[str]) -> dict[int, str]:
    """Target index -> the bit each read must return: the bit of the latest write before it."""
    answers, memory = {}, None
    for k, instruction in enumerate(words[0::2]):
        if instruction == "w":
            memory = words[2 * k + 1]
        elif instruction == "r":
            assert memory is not None, "a read before any write"
            answers[2 * k] = memory  # the bit after instruction k is the target at index 2k
    return answers


@pytest.mark.parametrize(("split", "p"), [("id", 0.8), ("ood_sparse", 0.98), ("ood_dense", 0.1)])
def test_flipflop_sequences_open_with_a_write_and_close_with_a_read(split: str, p: float) -> None:
    task = build_task("flipflop")
    assert task.splits()[split] == {"p": p}
    for length, seed in ((256, 0), (2, 1), (3, 2), (17, 3)):
        batch = task.sample(256, length, generator=gen(seed), **task.splits()[split])
        assert batch.inputs.shape == (256, 2 * length - 1)
        for b in range(256):
            words = sequence(task, batch, b)
            assert len(words) == 2 * length
            assert words[0] == "w" and words[-2] == "r" and words[-1] in ("0", "1")
            answers = read_answers(words)
            assert batch.mask[b].nonzero().flatten().tolist() == sorted(answers)
            assert [words[t + 1] for t in sorted(answers)] == list(answers.values())
            assert batch.mask[b, -1]  # the final read is scored


@pytest.mark.parametrize(("split", "p"), [("id", 0.8), ("ood_sparse", 0.98), ("ood_dense", 0.1)])
def test_flipflop_middle_instructions_are_iid_with_probability_p(split: str, p: float) -> None:
    task = build_task("flipflop")
    batch = task.sample(512, 256, generator=gen(5), **task.splits()[split])
    middle = batch.inputs[:, 2:-1:2]  # instructions 1 .. 254 of 0 .. 255
    assert middle.shape == (512, 254)
    n = middle.numel()
    for token, expected in (("i", p), ("w", (1 - p) / 2), ("r", (1 - p) / 2)):
        freq = middle.eq(task.tokens.index(token)).sum().item() / n
        # 130k draws: a standard deviation of at most 0.0014, so 0.01 is about 7 of them.
        assert freq == pytest.approx(expected, abs=0.01), token
    # Independence across positions: the instruction frequencies do not drift along the sequence.
    first, second = middle[:, :127], middle[:, 127:]
    ignore = task.tokens.index("i")
    assert first.eq(ignore).float().mean().item() == pytest.approx(
        second.eq(ignore).float().mean().item(), abs=0.01
    )


def test_flipflop_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match="length must be an integer >= 2, got 1"):
        build_task("flipflop").sample(4, 1, generator=gen(0))
