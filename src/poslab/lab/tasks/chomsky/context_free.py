"""The context-free-level Chomsky tasks (Deletang et al., arXiv 2207.02098, table 1)."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from poslab.lab.tasks.base import RandomStream, register
from poslab.lab.tasks.chomsky.base import END, ChomskyTask

MODULUS = 5
DIGITS = tuple(str(d) for d in range(MODULUS))
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@register("stack_manipulation")
class StackManipulation(ChomskyTask):
    """A binary stack (bottom to top) and operations -> the final stack, top first, then ``END``.

    The input is k stack symbols (k uniform in 1..n-1) followed by n - k operations, each uniform
    over ``POP`` / ``PUSH0`` / ``PUSH1``; a POP on an empty stack does nothing; length 1 is a lone
    stack symbol. Output length n + 1 (the stack can grow to n - 1 symbols, plus the end token).
    Tokens: ``0``, ``1``, ``POP``, ``PUSH0``, ``PUSH1`` = 0..4; outputs ``0``, ``1``, ``END``.
    """

    level = "context_free"
    input_alphabet = ("0", "1", "POP", "PUSH0", "PUSH1")
    output_alphabet = ("0", "1", END)

    def output_length(self, length: int) -> int:
        return length + 1

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        stack_len = torch.randint(1, max(length, 2), (batch_size, 1), generator=generator)
        symbols = torch.randint(0, 2, (batch_size, length), generator=generator)
        actions = torch.randint(2, 5, (batch_size, length), generator=generator)
        x = torch.where(torch.arange(length) < stack_len, symbols, actions)

        y = torch.zeros(batch_size, length + 1, dtype=torch.long)
        for b, row in enumerate(x.tolist()):
            stack: list[int] = []
            for token in row:
                if token < 2:
                    stack.append(token)
                elif token == 2:
                    if stack:
                        stack.pop()
                else:
                    stack.append(token - 3)
            y[b, : len(stack) + 1] = torch.tensor([*stack[::-1], 2])
        return x, y


@register("reverse_string")
class ReverseString(ChomskyTask):
    """Binary string -> the same string reversed (output length n)."""

    level = "context_free"
    input_alphabet = ("0", "1")
    output_alphabet = ("0", "1")

    def output_length(self, length: int) -> int:
        return length

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 2, (batch_size, length), generator=generator)
        return x, x.flip(dims=[1])


def bracketed_expression(rng: RandomStream, length: int, *, times: bool) -> tuple[list[str], int]:
    """A random bracketed expression of ``length`` characters over digits 0-4, and its value mod 5.

    The reference grammar: lengths 1-4 are ``d``, ``-d``, ``(d)``, ``(-d)``; longer ones are
    ``(left op right)`` with the left length uniform in 1..length-4 and op uniform over ``+``, ``-``
    (and ``*`` when ``times``).
    """
    if length <= 4:
        d = rng.randint(0, MODULUS - 1)
        forms = ([str(d)], ["-", str(d)], ["(", str(d), ")"], ["(", "-", str(d), ")"])
        return forms[length - 1], (-d if length in (2, 4) else d) % MODULUS
    left_len = rng.randint(1, length - 4)
    left, left_value = bracketed_expression(rng, left_len, times=times)
    right, right_value = bracketed_expression(rng, length - 3 - left_len, times=times)
    op = rng.choice("+-*" if times else "+-")
    return ["(", *left, op, *right, ")"], OPERATORS[op](left_value, right_value) % MODULUS


@register("modular_arithmetic")
class ModularArithmeticBrackets(ChomskyTask):
    """Bracketed expression over digits 0-4 with ``+``, ``-``, ``*``, unary minus -> value mod 5.

    The reference task ``modular_arithmetic_brackets`` (with multiplication, as in its experiments);
    the input has exactly n characters. Tokens: ``0``..``4``, ``+``, ``-``, ``*``, ``(``, ``)``.
    """

    level = "context_free"
    input_alphabet = (*DIGITS, "+", "-", "*", "(", ")")
    output_alphabet = DIGITS

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rng, ids = RandomStream(generator), {t: i for i, t in enumerate(self.input_alphabet)}
        xs, ys = [], []
        for _ in range(batch_size):
            expr, value = bracketed_expression(rng, length, times=True)
            xs.append([ids[t] for t in expr])
            ys.append([value])
        return torch.tensor(xs), torch.tensor(ys)


@register("solve_equation")
class SolveEquation(ChomskyTask):
    """A bracketed linear equation mod 5 with one unknown ``x`` -> the value of x.

    As the reference: an expression of n - 2 characters with ``+`` and ``-`` only (so x is unique),
    one digit replaced by ``x`` (a uniform start position, moved right cyclically to the next
    digit), then ``=`` and the expression's value. Lengths below 3 are raised to 3. Tokens:
    ``0``..``4``, ``+``, ``-``, ``(``, ``)``, ``x``, ``=``.
    """

    level = "context_free"
    input_alphabet = (*DIGITS, "+", "-", "(", ")", "x", "=")
    output_alphabet = DIGITS
    min_length = 3

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rng, ids = RandomStream(generator), {t: i for i, t in enumerate(self.input_alphabet)}
        xs, ys = [], []
        for _ in range(batch_size):
            expr, value = bracketed_expression(rng, length - 2, times=False)
            k = rng.randint(0, len(expr) - 1)
            while expr[k] not in DIGITS:
                k = (k + 1) % len(expr)
            equation = [*expr[:k], "x", *expr[k + 1 :], "=", str(value)]
            xs.append([ids[t] for t in equation])
            ys.append([int(expr[k])])
        return torch.tensor(xs), torch.tensor(ys)
