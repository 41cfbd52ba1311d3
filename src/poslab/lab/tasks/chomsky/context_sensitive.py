"""The context-sensitive-level Chomsky tasks (Deletang et al., arXiv 2207.02098, table 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.lab.tasks.base import register
from poslab.lab.tasks.chomsky.base import END, ChomskyTask, bits_to_int, int_to_bits

BINARY = ("0", "1")


@register("duplicate_string")
class DuplicateString(ChomskyTask):
    """Binary string s -> ss (output length 2n)."""

    level = "context_sensitive"
    input_alphabet = BINARY
    output_alphabet = BINARY

    def output_length(self, length: int) -> int:
        return 2 * length

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (batch_size, length), generator=generator)
        return x, torch.cat([x, x], dim=1)


@register("missing_duplicate")
class MissingDuplicate(ChomskyTask):
    """ss with one symbol replaced by ``_`` -> the missing symbol.

    s is binary of length n // 2; an odd n ends with one ``#`` (empty) token; lengths below 2 are
    raised to 2. Tokens: ``0``, ``1``, ``_`` (missing), ``#`` (empty) = 0..3.
    """

    level = "context_sensitive"
    input_alphabet = ("0", "1", "_", "#")
    output_alphabet = BINARY
    min_length = 2

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        half = torch.randint(0, 2, (batch_size, length // 2), generator=generator)
        doubled = torch.cat([half, half], dim=1)
        where = torch.randint(0, doubled.shape[1], (batch_size, 1), generator=generator)
        y = doubled.gather(1, where)
        x = doubled.scatter(1, where, 2)
        if length % 2:
            x = torch.cat([x, torch.full((batch_size, 1), 3)], dim=1)
        return x, y


@register("odds_first")
class OddsFirst(ChomskyTask):
    """s_1 .. s_n (binary) -> s_2 s_4 s_6 .. s_1 s_3 s_5 .. (even positions, 1-based, first).

    The order of DeepMind's code, which produced the published numbers: it takes the symbols at odd
    0-based indices first, e.g. 00110101 -> 0111 0100. The paper and that code's own docstring say
    the other half comes first (s_1 s_3 ..); the two are mirror images of equal difficulty, but
    only the code's order gives the same targets.
    """

    level = "context_sensitive"
    input_alphabet = BINARY
    output_alphabet = BINARY

    def output_length(self, length: int) -> int:
        return length

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (batch_size, length), generator=generator)
        return x, torch.cat([x[:, 1::2], x[:, 0::2]], dim=1)


class _BinaryArithmetic(ChomskyTask):
    """Two little-endian binary numbers around an operator -> the result, little-endian, ``END``.

    As the reference: the first number takes k digits (k uniform in 1..n-2), the second n-1-k; each
    is uniform over the non-zero numbers of that many digits (leading zeros allowed). The result has
    no leading zeros and is followed by ``END``; the rest of the output is unscored padding. Lengths
    below 3 are raised to 3.
    """

    level = "context_sensitive"
    output_alphabet = ("0", "1", END)
    min_length = 3

    def _combine(self, a: int, b: int) -> int:
        raise NotImplementedError

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        split = torch.randint(1, length - 1, (batch_size,), generator=generator).tolist()
        bits = torch.randint(0, 2, (batch_size, length), generator=generator).tolist()
        x = torch.empty(batch_size, length, dtype=torch.long)
        y = torch.zeros(batch_size, self.output_length(length), dtype=torch.long)
        for b, (k, row) in enumerate(zip(split, bits, strict=True)):
            while not any(row[:k]) or not any(row[k + 1 :]):  # zero operands are redrawn
                row = torch.randint(0, 2, (length,), generator=generator).tolist()
            a = bits_to_int(row[:k], little_endian=True)
            c = bits_to_int(row[k + 1 :], little_endian=True)
            row[k] = 2
            x[b] = torch.tensor(row)
            result = [*int_to_bits(self._combine(a, c), little_endian=True), 2]
            y[b, : len(result)] = torch.tensor(result)
        return x, y


@register("binary_addition")
class BinaryAddition(_BinaryArithmetic):
    """``a + b`` in little-endian binary -> a + b, little-endian, ``END`` (output length n + 1).

    Tokens: ``0``, ``1``, ``+`` = 0..2; outputs ``0``, ``1``, ``END``.
    """

    input_alphabet = ("0", "1", "+")

    def output_length(self, length: int) -> int:
        return length + 1

    def _combine(self, a: int, b: int) -> int:
        return a + b


@register("binary_multiplication")
class BinaryMultiplication(_BinaryArithmetic):
    """``a * b`` in little-endian binary -> a * b, little-endian, then ``END`` (output length n).

    Tokens: ``0``, ``1``, ``*`` = 0..2 (the reference uses one operator token for + and *);
    outputs ``0``, ``1``, ``END``.
    """

    input_alphabet = ("0", "1", "*")

    def output_length(self, length: int) -> int:
        return length

    def _combine(self, a: int, b: int) -> int:
        return a * b


@register("compute_sqrt")
class ComputeSqrt(ChomskyTask):
    """Big-endian binary number (n digits, not 0) -> floor(sqrt), big-endian, ceil(n / 2) digits."""

    level = "context_sensitive"
    input_alphabet = BINARY
    output_alphabet = BINARY

    def output_length(self, length: int) -> int:
        return math.ceil(length / 2)

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        width = self.output_length(length)
        rows = torch.randint(0, 2, (batch_size, length), generator=generator).tolist()
        ys = []
        for b, row in enumerate(rows):
            while not any(row):  # the reference draws from 1..2^n - 1
                row = rows[b] = torch.randint(0, 2, (length,), generator=generator).tolist()
            root = math.isqrt(bits_to_int(row, little_endian=False))
            ys.append(int_to_bits(root, little_endian=False, width=width))
        return torch.tensor(rows), torch.tensor(ys)


@register("bucket_sort")
class BucketSort(ChomskyTask):
    """String over the 5 symbols ``0``..``4`` -> the same symbols sorted (output length n)."""

    level = "context_sensitive"
    permutation_invariant = True
    input_alphabet = ("0", "1", "2", "3", "4")
    output_alphabet = ("0", "1", "2", "3", "4")

    def output_length(self, length: int) -> int:
        return length

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 5, (batch_size, length), generator=generator)
        return x, x.sort(dim=1).values
