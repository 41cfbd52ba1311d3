"""The regular-level Chomsky tasks (Deletang et al., arXiv 2207.02098, table 1): one output."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.lab.tasks.base import register
from poslab.lab.tasks.chomsky.base import ChomskyTask

MODULUS = 5
DIGITS = tuple(str(d) for d in range(MODULUS))
PLUS, MINUS, TIMES = range(MODULUS, MODULUS + 3)


@register("even_pairs")
class EvenPairs(ChomskyTask):
    """Binary string -> is the number of ``01`` plus ``10`` pairs even (``even``=0 / ``odd``=1)."""

    level = "regular"
    input_alphabet = ("0", "1")
    output_alphabet = ("even", "odd")

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (batch_size, length), generator=generator)
        changes = (x[:, 1:] != x[:, :-1]).sum(dim=1)
        return x, (changes % 2)[:, None]


@register("modular_arithmetic_simple")
class ModularArithmeticSimple(ChomskyTask):
    """Digits 0-4 alternating with ``+``, ``-``, ``*`` (usual precedence) -> the value mod 5.

    The expression has odd length, as in the reference generator: an even length n gives n - 1.
    Tokens: ``0``..``4`` = 0..4, ``+`` ``-`` ``*`` = 5, 6, 7 (the reference's unused blank ``_`` is
    left out).
    """

    level = "regular"
    input_alphabet = (*DIGITS, "+", "-", "*")
    output_alphabet = DIGITS

    def input_length(self, length: int) -> int:
        return length if length % 2 == 1 else length - 1

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n_ops = length // 2
        digits = torch.randint(0, MODULUS, (batch_size, n_ops + 1), generator=generator)
        ops = torch.randint(PLUS, TIMES + 1, (batch_size, n_ops), generator=generator)
        x = torch.empty(batch_size, length, dtype=torch.long)
        x[:, 0::2], x[:, 1::2] = digits, ops
        # Left to right: `total` holds the finished additive terms, `term` the product being built.
        total, term = torch.zeros(batch_size, dtype=torch.long), digits[:, 0]
        for k in range(n_ops):
            op, d = ops[:, k], digits[:, k + 1]
            times = op == TIMES
            total = torch.where(times, total, total + term) % MODULUS
            term = torch.where(times, term * d, torch.where(op == PLUS, d, -d)) % MODULUS
        return x, ((total + term) % MODULUS)[:, None]


@register("parity_check")
class ParityCheck(ChomskyTask):
    """Binary string -> parity of the number of 1s (``even``=0 / ``odd``=1)."""

    level = "regular"
    permutation_invariant = True
    input_alphabet = ("0", "1")
    output_alphabet = ("even", "odd")

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (batch_size, length), generator=generator)
        return x, (x.sum(dim=1) % 2)[:, None]


@register("cycle_navigation")
class CycleNavigation(ChomskyTask):
    """Moves ``-1``, ``0``, ``+1`` (ids 0, 1, 2) from position 0 on a 5-cycle -> final position."""

    level = "regular"
    permutation_invariant = True
    input_alphabet = ("-1", "0", "+1")
    output_alphabet = DIGITS

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 3, (batch_size, length), generator=generator)
        return x, ((x - 1).sum(dim=1) % MODULUS)[:, None]
