"""Multi-query associative recall, MQAR (Arora et al., "Zoology: Measuring and Improving Recall in
Efficient Language Models", arXiv 2312.04927, section 3): key-value pairs, then queries of the keys,
each to be answered with its value.

A length-generalisation probe: the number of pairs and the distance from a pair to its query both
grow with the sequence length, so a longer test sequence asks for more, and longer, look-ups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from poslab.lab.tasks.base import Batch, Task, check_int, check_split_length, parse_eval_lengths, register

FILLER = 0


@register("mqar")
class MQAR(Task):
    """``k3 v17 k9 v2 ... k12 v40 . . k9 v2 . . . . k3 v17 . ...``: n pairs, then n queries.

    A sequence has ``length`` + 1 tokens (a batch is (B, ``length``)), n = (``length`` + 1) //
    ``tokens_per_pair`` pairs. The first 2n tokens are the pairs: n distinct keys (uniform among
    ``n_keys``, without replacement) each followed by its value (uniform among ``n_values``, with
    replacement). The remaining ``length`` + 1 - 2n tokens are cut into two-token slots (a last odd
    token is filler); n of the slots, uniformly chosen, hold the queries, each key once in a random
    order, as the key followed by its value; every other token is the filler ``.``. Only the
    values after the query keys are scored (n a sequence). The distance from a pair to its query is
    uniform over the sequence, so it grows with ``length`` like the number of pairs. With the
    default 8 tokens a pair, half of the query region is filler.

    Differences from Zoology's generator: the queries' slots are uniform rather than placed with a
    power-law gap, and keys are queried once each in a random order (Zoology queries every key).
    Both are as in the paper's description of a sequence: all pairs first, then queries, answered
    by the value.

    Tokens: ``.`` = 0, keys ``k0`` ... = 1..``n_keys``, values ``v0`` ... after them. Chance is
    1 / ``n_values``. Splits: ``id`` (the training length) and, with ``eval_lengths``, ``by_length``
    (each of those lengths; a length needing more pairs than ``n_keys`` is refused).

    Args:
        n_keys: size of the key vocabulary (at least the pairs of the longest evaluated sequence).
        n_values: size of the value vocabulary.
        tokens_per_pair: sequence tokens per pair (at least 4: the pair and its query).
        max_pairs: at most this many pairs (None: no cap); past it a longer sequence keeps the
            pairs and lengthens only the look-ups (the query region grows with filler).
        eval_lengths: the lengths of the ``by_length`` split, e.g. ``"128,256,512"``.
    """

    causal = True
    headline = "accuracy"
    split_notes = {
        "id": "the training length (its number of pairs)",
        "by_length": "each evaluation length, with proportionally more pairs and longer look-ups",
    }

    def __init__(
        self,
        *,
        n_keys: int = 512,
        n_values: int = 512,
        tokens_per_pair: int = 8,
        max_pairs: int | None = None,
        eval_lengths: Sequence[int] | str | None = None,
    ) -> None:
        check_int("mqar: n_keys", n_keys, minimum=1)
        check_int("mqar: n_values", n_values, minimum=1)
        check_int("mqar: tokens_per_pair", tokens_per_pair, minimum=4)
        if max_pairs is not None:
            check_int("mqar: max_pairs", max_pairs, minimum=1)
        self.n_keys, self.n_values, self.tokens_per_pair = n_keys, n_values, tokens_per_pair
        self.max_pairs = max_pairs
        self.eval_lengths = parse_eval_lengths("mqar", eval_lengths)
        if self.eval_lengths is not None:
            self.n_pairs(self.eval_lengths[-1])  # refused now rather than after training
        self.tokens = (".", *(f"k{i}" for i in range(n_keys)), *(f"v{i}" for i in range(n_values)))
        self.output_tokens = self.tokens
        self.chance = 100.0 / n_values

    def n_pairs(self, length: int) -> int:
        """The number of pairs (and of queries) in a sequence of ``length`` + 1 tokens."""
        n = (length + 1) // self.tokens_per_pair
        if self.max_pairs is not None:
            n = min(n, self.max_pairs)
        if n < 1:
            raise ValueError(f"mqar: length {length} holds no pair ({self.tokens_per_pair} tokens a pair)")
        if n > self.n_keys:
            raise ValueError(
                f"mqar: length {length} needs {n} distinct keys, more than n_keys={self.n_keys}; "
                "raise n_keys or tokens_per_pair"
            )
        return n

    def splits(self) -> dict[str, dict]:
        splits: dict[str, dict] = {"id": {}}
        if self.eval_lengths is not None:
            splits["by_length"] = {"lengths": self.eval_lengths}
        return splits

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        lengths: Sequence[int] | None = None,
    ) -> Batch:
        """``batch_size`` sequences of ``length`` + 1 tokens; inputs, targets and mask are
        (B, ``length``), the mask True where the target is a queried value."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("mqar: length", length, minimum=1)
        check_split_length("mqar", length, lengths)
        n = self.n_pairs(length)
        b = batch_size
        keys = torch.rand(b, self.n_keys, generator=generator).argsort(dim=1)[:, :n] + 1  # (B, n)
        values = torch.randint(0, self.n_values, (b, n), generator=generator) + 1 + self.n_keys
        region = length + 1 - 2 * n  # the query region, in tokens
        slots = torch.rand(b, region // 2, generator=generator).argsort(dim=1)[:, :n]  # (B, n)
        order = torch.rand(b, n, generator=generator).argsort(dim=1)  # query i asks pair order[i]

        seq = torch.full((b, length + 1), FILLER, dtype=torch.long)
        seq[:, 0 : 2 * n : 2], seq[:, 1 : 2 * n : 2] = keys, values
        at = 2 * n + 2 * slots  # (B, n) the query keys' positions
        seq.scatter_(1, at, keys.gather(1, order))
        seq.scatter_(1, at + 1, values.gather(1, order))
        mask = torch.zeros(b, length, dtype=torch.bool)
        mask.scatter_(1, at, True)  # the target at a query key's position is its value
        return Batch(seq[:, :-1], seq[:, 1:], mask)

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """error and seq_error (Task.metrics) plus accuracy: % of queried values right, pooled."""
        result = super().metrics(logits, batch)
        result["accuracy"] = 100.0 - result["error"]
        return result
