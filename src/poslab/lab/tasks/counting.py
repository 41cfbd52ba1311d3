"""The counting task of the CoPE paper (Golovneva et al., arXiv 2405.18719, section 5.4), following
its official generator (facebookresearch/RAM, projects/cope/scripts/count_data_gen.py)."""

from __future__ import annotations

import string

import torch

from poslab.lab.tasks.base import Batch, RandomStream, Task, check_int, register

MAX_VALUE = 10
# Statement kinds and the official sampling weights.
SET, PASS, INCREMENT = range(3)
WEIGHTS = (1.0, 50.0, 7.0)
KEYWORDS = ("<pad>", "=", ";", "pass;", "++;", "print")
PAD = 0


@register("counting")
class Counting(Task):
    """Track a variable through a program of resets, increments and no-ops, then print it.

    A program is 3 to ``length`` statements (the count is uniform), each ``x = 0 ;`` (weight 1),
    ``pass;`` (weight 50) or ``x ++;`` (weight 7), then ``print x`` and the answer, the value of x
    in 0..10, e.g. ``b = 0 ; pass; pass; b ++; pass; print b 1``. ``x = 0`` picks any of the
    ``n_vars`` variables; ``x ++`` picks a variable already set, and when none is set or the value
    would pass 10 the statement is redrawn; ``print`` picks a set variable. As in the official
    generator, a program in which no variable has been set by print time is thrown away and redrawn
    whole (length included), which is how a printable variable is guaranteed.

    Tokens are the official words (whitespace-split): ``<pad>``=0, ``=``, ``;``, ``pass;``, ``++;``,
    ``print`` = 1..5, the numbers ``0``..``10`` = 6..16, then the variables ``a``, ``b``, ... (the
    official tokenizer numbers the words in order of first appearance and reserves an unused
    ``<sta>``: a word that never occurs changes no number). The model reads the sequence as a
    language model; only the answer token is scored. Sequences are right-padded with ``<pad>`` to
    the longest in the batch. One split, ``id``: the paper tests in distribution.

    The official run script generates programs of up to 512 statements (up to about 600 tokens)
    and trains with a block size of 512: its batch collator keeps the last 512 tokens of a longer
    sequence. ``max_tokens`` does the same. The answer stays the value in the whole program even
    when the cut drops the variable's last reset (and perhaps some increments after it), as in the
    official data; the answer then cannot always be read off what is left (about 1 program in
    2000 at 512 statements; 13% of them are cut at all).

    Args:
        n_vars: number of variables (the paper: 1, 3 or 5).
        max_tokens: keep only the last ``max_tokens`` tokens of each program, answer included (the
            official block size, 512); None keeps programs whole.
    """

    causal = True

    def __init__(self, *, n_vars: int = 3, max_tokens: int | None = None) -> None:
        check_int("n_vars", n_vars, minimum=1)
        if n_vars > 26:
            raise ValueError(f"n_vars must be at most 26, got {n_vars}")
        if max_tokens is not None:
            check_int("max_tokens", max_tokens, minimum=3)  # at least ``print x`` and the answer
        self.n_vars = n_vars
        self.max_tokens = max_tokens
        self.variables = tuple(string.ascii_lowercase[:n_vars])
        numbers = tuple(str(v) for v in range(MAX_VALUE + 1))
        self.tokens = (*KEYWORDS, *numbers, *self.variables)
        self.output_tokens = self.tokens
        self._id = {token: i for i, token in enumerate(self.tokens)}
        self.chance = 100.0 / (MAX_VALUE + 1)

    def splits(self) -> dict[str, dict]:
        return {"id": {}}

    def sample(self, batch_size: int, length: int, *, generator: torch.Generator) -> Batch:
        """``batch_size`` programs of 3 to ``length`` statements each, cut to their last
        ``max_tokens`` tokens if set: inputs and targets are then at most ``max_tokens - 1`` long."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("length", length, minimum=3)
        rng = RandomStream(generator)
        keep = -self.max_tokens if self.max_tokens is not None else 0
        seqs = [[self._id[w] for w in self._program(rng, length)[keep:]] for _ in range(batch_size)]
        width = max(map(len, seqs))
        seq = torch.full((batch_size, width), PAD, dtype=torch.long)
        mask = torch.zeros(batch_size, width - 1, dtype=torch.bool)
        for b, words in enumerate(seqs):
            seq[b, : len(words)] = torch.tensor(words)
            mask[b, len(words) - 2] = True  # the target there is the answer
        return Batch(seq[:, :-1], seq[:, 1:], mask)

    def _program(self, rng: RandomStream, max_steps: int) -> list[str]:
        """The words of one program, ending with ``print x`` and the answer."""
        while True:
            values: dict[str, int] = {}  # insertion order, as the official generator's dict
            words: list[str] = []
            for _ in range(rng.randint(3, max_steps)):
                words += self._statement(rng, values)
            if values:
                var = rng.choice(list(values))
                return [*words, "print", var, str(values[var])]

    def _statement(self, rng: RandomStream, values: dict[str, int]) -> list[str]:
        while True:
            kind = rng.weighted(WEIGHTS)
            if kind == SET:
                var = rng.choice(self.variables)
                values[var] = 0
                return [var, "=", "0", ";"]
            if kind == PASS:
                return ["pass;"]
            if values:
                var = rng.choice(list(values))
                if values[var] < MAX_VALUE:
                    values[var] += 1
                    return [var, "++;"]
