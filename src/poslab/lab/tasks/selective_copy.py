"""Selective copy (Gu and Dao, "Mamba", arXiv 2312.00752, section 3.1), in the decoder form and with
the dense / sparse out-of-distribution splits of the CoPE paper (arXiv 2405.18719, section 5.3)."""

from __future__ import annotations

import torch

from poslab.lab.tasks.base import Batch, Task, check_int, register

BLANK, SEP, FIRST_SYMBOL = 0, 1, 2


@register("selective_copy")
class SelectiveCopy(Task):
    """Copy the content tokens scattered among blanks, in order, after a separator.

    A sequence is ``length`` content tokens placed at random positions (order kept) among
    ``n_blanks`` blank tokens, then the separator, then the content tokens again:
    ``_ c _ _ a _ b _ | c a b``. The model reads it as a language model; only the copied content
    tokens (the targets from the separator on) are scored, so ``length`` targets per sequence.

    ``length`` is the number of content tokens, fixed across splits (the CoPE paper uses 128; 16 is
    a CPU-sized choice). The splits differ only in the number of blanks, id : dense : sparse =
    2 : 1 : 4, i.e. ``n_blanks``, ``n_blanks // 2`` and ``2 * n_blanks``. A batch is
    (B, 2 * length + blanks).

    Tokens: ``_`` (blank)=0, ``|`` (separator)=1, content symbols ``a``, ``b``, ... = 2, 3, ...

    Args:
        n_blanks: number of blanks in the training (id) split.
        n_symbols: size of the content alphabet.
    """

    causal = True

    def __init__(self, *, n_blanks: int = 64, n_symbols: int = 8) -> None:
        check_int("n_blanks", n_blanks, minimum=2)  # the dense split halves it
        check_int("n_symbols", n_symbols, minimum=1)
        if n_symbols > 26:
            raise ValueError(f"n_symbols must be at most 26, got {n_symbols}")
        self.n_blanks = n_blanks
        self.n_symbols = n_symbols
        self.tokens = ("_", "|", *(chr(ord("a") + k) for k in range(n_symbols)))
        self.output_tokens = self.tokens
        self.chance = 100.0 / n_symbols

    def splits(self) -> dict[str, dict[str, int]]:
        return {
            "id": {"n_blanks": self.n_blanks},
            "ood_dense": {"n_blanks": self.n_blanks // 2},
            "ood_sparse": {"n_blanks": 2 * self.n_blanks},
        }

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        n_blanks: int | None = None,
    ) -> Batch:
        """``batch_size`` sequences with ``length`` content tokens and ``n_blanks`` blanks."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("length", length, minimum=1)
        n_blanks = self.n_blanks if n_blanks is None else n_blanks
        check_int("n_blanks", n_blanks, minimum=0)

        region = length + n_blanks
        content = torch.randint(0, self.n_symbols, (batch_size, length), generator=generator)
        content = content + FIRST_SYMBOL
        # The first `length` entries of a random permutation, sorted, are uniform random slots.
        slots = torch.rand(batch_size, region, generator=generator).argsort(dim=1)[:, :length]
        slots = slots.sort(dim=1).values  # (B, length)

        seq = torch.full((batch_size, region + 1 + length), BLANK, dtype=torch.long)
        seq.scatter_(1, slots, content)
        seq[:, region] = SEP
        seq[:, region + 1 :] = content
        mask = torch.zeros(batch_size, seq.shape[1] - 1, dtype=torch.bool)
        mask[:, region:] = True  # the target at the separator is the first copied token
        return Batch(seq[:, :-1], seq[:, 1:], mask)
