"""Shared machinery of the Chomsky-hierarchy tasks (Deletang et al., "Neural Networks and the
Chomsky Hierarchy", arXiv 2207.02098), in the encoder protocol of Ruoss et al. (arXiv 2305.16843)
used by DAPE (arXiv 2405.14722): the model sees the input followed by |y| placeholder tokens and
predicts the output symbols at the placeholders."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from poslab.lab.tasks.base import Batch, Task, check_int

PLACEHOLDER = "?"
END = "END"


class ChomskyTask(Task):
    """Base class: a subclass sets the alphabets and implements `output_length` and `_generate`.

    Layout of a batch for input length n and output length m = ``output_length(n)``:
    ``inputs = [x_1 .. x_n, ? .. ?]`` (m placeholders, the last input id), ``targets`` holds the
    output ids at the m placeholder positions (0 elsewhere, unscored), and ``mask`` is True at the
    scored placeholders. Tasks with an end token (``END``, the last output id) score up to and
    including it; the positions after it are padding and not scored. All rows share one n.

    Splits: ``{"id": {"lengths": range(1, max_train_len + 1)}, "ood": {"lengths":
    range(max_train_len + 1, max_eval_len + 1)}}``. The caller picks the length (uniform over the id
    range per training batch; each ood length in turn for evaluation) and passes the split along:
    ``sample(B, n, generator=g, **splits()["ood"])`` checks that n lies in the split.

    Class attributes a subclass sets:
        level: "regular", "context_free" or "context_sensitive".
        input_alphabet / output_alphabet: token names of the input and output symbols.
        min_length: lengths below it are raised to it (where the task is undefined for them).
        permutation_invariant: the answer does not depend on the order of the input (parity check,
            cycle navigation, bucket sort: the tasks the DAPE paper's task table marks so, as a
            secondary source quotes it); a model needs no position signal for them.
    """

    causal = False
    headline = "accuracy"
    level: ClassVar[str]
    input_alphabet: ClassVar[tuple[str, ...]]
    output_alphabet: ClassVar[tuple[str, ...]]
    min_length: ClassVar[int] = 1
    permutation_invariant: ClassVar[bool] = False

    def __init__(self, *, max_train_len: int = 40, max_eval_len: int = 500) -> None:
        check_int("max_train_len", max_train_len, minimum=1)
        check_int("max_eval_len", max_eval_len, minimum=1)
        if max_eval_len <= max_train_len:
            raise ValueError(f"max_eval_len must exceed max_train_len={max_train_len}, got {max_eval_len}")
        self.max_train_len = max_train_len
        self.max_eval_len = max_eval_len
        self.tokens = (*self.input_alphabet, PLACEHOLDER)
        self.output_tokens = self.output_alphabet
        # Guessing among the symbols proper: the end token is one position per sequence.
        self.chance = 100.0 / len([t for t in self.output_alphabet if t != END])

    @property
    def has_end_token(self) -> bool:
        return END in self.output_alphabet

    @property
    def placeholder_id(self) -> int:
        return len(self.input_alphabet)

    def splits(self) -> dict[str, dict[str, range]]:
        return {
            "id": {"lengths": range(1, self.max_train_len + 1)},
            "ood": {"lengths": range(self.max_train_len + 1, self.max_eval_len + 1)},
        }

    def input_length(self, length: int) -> int:
        """The input length actually generated for a requested ``length``."""
        return max(length, self.min_length)

    def output_length(self, length: int) -> int:
        """Number of output symbols (placeholders) for an input of ``length`` tokens."""
        return 1

    def _generate(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Inputs (B, length) in input ids and outputs (B, output_length(length)) in output ids.

        Tasks with an end token fill the outputs after it with 0.
        """
        raise NotImplementedError

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        lengths: range | None = None,
    ) -> Batch:
        """``batch_size`` examples of input length ``length``, checked against ``lengths``."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("length", length, minimum=1)
        if lengths is not None and length not in lengths:
            span = f"{lengths.start}..{lengths.stop - 1}"
            raise ValueError(f"length {length} is outside the split's lengths {span}")
        n = self.input_length(length)
        x, y = self._generate(batch_size, n, generator)
        m = y.shape[1]
        assert x.shape == (batch_size, n) and m == self.output_length(n), (x.shape, y.shape)

        inputs = torch.cat([x, torch.full((batch_size, m), self.placeholder_id)], dim=1)
        targets = torch.cat([torch.zeros(batch_size, n, dtype=torch.long), y], dim=1)
        scored = torch.ones(batch_size, m, dtype=torch.bool)
        if self.has_end_token:
            end = y == len(self.output_alphabet) - 1
            # Scored up to and including the first end token: no end token strictly before.
            scored = (end.long().cumsum(dim=1) - end.long()) == 0
        mask = torch.cat([torch.zeros(batch_size, n, dtype=torch.bool), scored], dim=1)
        return Batch(inputs.long(), targets.long(), mask)

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """error and seq_error as for every task, plus accuracy: the % of correct tokens among all
        scored output positions of the batch, pooled, as DeepMind's code computes it (so it is
        100 - error). A sequence with a long output weighs more than a short one: this differs from
        a mean of per-sequence accuracies only where outputs end at an end token."""
        result = super().metrics(logits, batch)
        correct, mask = self._correct(logits, batch)
        n_scored = mask.sum().item()
        result["accuracy"] = 100.0 * (correct & mask).sum().item() / n_scored if n_scored else float("nan")
        return result


def bits_to_int(bits: list[int], *, little_endian: bool) -> int:
    """The integer written by a list of 0/1 digits."""
    digits = bits[::-1] if little_endian else bits
    return int("".join(map(str, digits)) or "0", 2)


def int_to_bits(value: int, *, little_endian: bool, width: int = 0) -> list[int]:
    """The 0/1 digits of ``value`` (no leading zeros beyond ``width`` digits)."""
    digits = [int(c) for c in f"{value:b}".zfill(width)]
    return digits[::-1] if little_endian else digits
