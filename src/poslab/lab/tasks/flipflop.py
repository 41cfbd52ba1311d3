"""Flip-flop language modelling (Liu et al., "Exposing Attention Glitches with Flip-Flop Language
Modeling", arXiv 2306.00946), as used by the CoPE paper (arXiv 2405.18719, section 5.2)."""

from __future__ import annotations

import torch

from poslab.lab.tasks.base import Batch, Task, check_int, check_probability, register

WRITE, READ, IGNORE, ZERO, ONE = range(5)


@register("flipflop")
class FlipFlop(Task):
    """FFL(p): ``length`` (instruction, bit) pairs such as ``w 1 i 0 w 0 i 1 r 0``.

    Liu et al.'s canonical form: the first instruction is ``w`` (write), the last is ``r`` (read),
    and each one in between is ``i`` (ignore) with probability p and ``w`` or ``r`` with
    (1 - p) / 2 each, independently. Bits after ``w`` and ``i`` are uniform; the bit after ``r``
    equals the bit of the most recent ``w``. Only the bits after ``r`` are scored, so every
    sequence scores at least its final read, which at large p usually looks back further than any
    other (in FFL(0.98) with 256 pairs, about 90 pairs on average).

    Tokens: ``w``=0, ``r``=1, ``i``=2, ``0``=3, ``1``=4. The sequence has 2 * length tokens, so a
    batch is (B, 2 * length - 1). Splits: id FFL(p), ood_sparse FFL(p_sparse), ood_dense
    FFL(p_dense) (the paper: 0.8, 0.98, 0.1, with 256 pairs).

    Args:
        p: probability of ``i`` in the training (id) split.
        p_sparse: the same for the sparse out-of-distribution split (fewer reads and writes).
        p_dense: the same for the dense out-of-distribution split.
    """

    causal = True
    split_notes = {
        "id": "the training distribution (task.options.p of the instructions are 'ignore')",
        "ood_sparse": "far more 'ignore' instructions (p_sparse), so a read looks back further",
        "ood_dense": "far fewer 'ignore' instructions (p_dense): reads and writes everywhere",
    }

    def __init__(self, *, p: float = 0.8, p_sparse: float = 0.98, p_dense: float = 0.1) -> None:
        for key, value in {"p": p, "p_sparse": p_sparse, "p_dense": p_dense}.items():
            check_probability(key, value)
        self.p, self.p_sparse, self.p_dense = float(p), float(p_sparse), float(p_dense)
        self.tokens = ("w", "r", "i", "0", "1")
        self.output_tokens = self.tokens
        self.chance = 50.0

    def splits(self) -> dict[str, dict[str, float]]:
        return {
            "id": {"p": self.p},
            "ood_sparse": {"p": self.p_sparse},
            "ood_dense": {"p": self.p_dense},
        }

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        p: float | None = None,
    ) -> Batch:
        """``batch_size`` sequences of ``length`` >= 2 pairs from FFL(p) (default: the id split's p)."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("length", length, minimum=2)  # a first write and a last read
        p = self.p if p is None else p
        check_probability("p", p)

        u = torch.rand(batch_size, length, generator=generator)
        instr = torch.where(u < p, IGNORE, torch.where(u < p + (1 - p) / 2, WRITE, READ))  # (B, n)
        instr[:, 0], instr[:, -1] = WRITE, READ
        bits = torch.randint(0, 2, (batch_size, length), generator=generator)
        steps = torch.arange(length).expand(batch_size, length)
        last_write = torch.where(instr == WRITE, steps, -1).cummax(dim=1).values  # (B, n), >= 0
        bits = torch.where(instr == READ, bits.gather(1, last_write), bits)

        seq = torch.empty(batch_size, 2 * length, dtype=torch.long)
        seq[:, 0::2] = instr
        seq[:, 1::2] = bits + ZERO
        mask = torch.zeros(batch_size, 2 * length - 1, dtype=torch.bool)
        mask[:, 0::2] = instr == READ  # target at 2k is the bit after instruction k
        return Batch(seq[:, :-1], seq[:, 1:], mask)
