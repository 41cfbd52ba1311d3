"""Pass-key retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300, section 4.2):
a random key hidden at some depth of a long filler text must be repeated at its end.

A length-generalisation probe: the answer is a copy of tokens that lie anywhere from a few tokens
to the whole context back, so a model that retrieves the key at its training length but not at 2x..32x
shows that its attention cannot reach (or find) a token at a distance it has not seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from poslab.lab.tasks.base import (
    BYTE_NAMES,
    Batch,
    RandomStream,
    Task,
    check_int,
    check_probability,
    check_split_length,
    parse_eval_lengths,
    register,
)

KEY_LINE = "the pass key is {key}. remember it."
QUESTION = "\nwhat is the pass key? the pass key is "

# The filler: short neutral sentences drawn from a few templates and words (no digit, no "key"),
# so that its lines vary in length and the key's position cannot be read off a line count.
SUBJECTS = (
    "the grass", "the sky", "the sun", "the river", "a small dog", "the old house", "my friend",
    "the teacher", "a cold wind", "the garden", "the market", "this road", "the city", "a bird",
    "the children", "the farmer", "the train", "the lake", "the forest", "her brother",
)  # fmt: skip
PREDICATES = (
    "is green", "is blue", "looks calm today", "was quiet", "moves slowly", "sings in the morning",
    "stays at home", "waits by the door", "is far away", "feels warm", "runs to the hill",
    "sleeps in the shade", "goes back again", "is bright", "turns to the left", "reads a book",
    "walks along the shore", "opens the window", "seems happy", "rests after lunch",
)  # fmt: skip
NEWLINE = 0.2  # probability that a sentence ends its line (else a space follows it)


def _parse_depths(value: Any) -> tuple[float, ...]:
    """``"0,0.5,1"`` or a sequence of fractions -> a tuple of fractions in [0, 1]."""
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"passkey: eval_depths must be fractions such as 0,0.5,1, got {value!r}"
            ) from None
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"passkey: eval_depths must be fractions such as 0,0.5,1, got {value!r}")
    for depth in value:
        check_probability("passkey: eval_depths", depth)
    return tuple(sorted({float(d) for d in value}))


def depth_split(depth: float) -> str:
    """The name of the split at one depth: ``depth_0``, ``depth_25``, ..., ``depth_100`` (percent)."""
    return f"depth_{round(100 * depth):d}"


@register("passkey")
class Passkey(Task):
    """Filler text, one line ``the pass key is 31415. remember it.`` at some depth, and at the end
    ``what is the pass key? the pass key is 31415``; the model must write the key's digits.

    Byte-level: one token per byte (ids 0..255, ASCII text). A sequence of ``length`` + 1 bytes is
    read as a language model, so a batch is (B, ``length``) (``length`` is the context in tokens,
    ``task.train_len`` in training). Layout::

        <filler, a bytes> the pass key is KKKKK. remember it. <filler, b bytes>
        what is the pass key? the pass key is KKKKK

    The filler is sentences such as ``the river runs to the hill.`` drawn from 20 subjects x 20
    predicates (one sentence in five ends its line), cut to exactly a and b bytes (the first part
    keeps its end, so the key line follows a whole sentence; the second keeps its start), with
    a + b fixed by ``length``. The key is ``n_digits`` uniform digits; its line starts a bytes into
    the filler, a = round(depth * (a + b)), so depth 0 puts it first and depth 1 just before the
    question; a random depth draws a uniformly in 0..a + b. Only the last ``n_digits`` targets (the
    answer) are scored: ``accuracy`` per digit and ``key_accuracy`` of whole keys (100 -
    ``seq_error``); chance is 10% a digit.

    Splits: ``id`` (the training depth, at the training length); with ``eval_lengths``,
    ``by_length`` (the training depth at each of those lengths) and one split per depth of
    ``eval_depths``, ``depth_0`` ... ``depth_100`` (percent), at each of those lengths: results.json's
    ``metrics["lengths"]["depth_50"]["1024"]`` is one cell of the depth x length heat map,
    ``metrics["splits"]["depth_50"]`` its row mean and ``metrics["lengths"]["by_length"]`` the
    accuracy per length.

    Args:
        depth: the training depth, a fraction in [0, 1], or None for a random depth per sequence.
        n_digits: digits of the key.
        eval_lengths: the lengths (tokens) the evaluation splits range over, e.g. ``"256,512,1024"``
            (include the training length for an in-distribution column); None: only ``id``.
        eval_depths: the depths of the ``depth_*`` splits (fractions; empty: no depth splits).
    """

    causal = True
    headline = "accuracy"
    split_notes = {
        "id": "the training length and depth",
        "by_length": "the training depth at each evaluation length",
        **{
            depth_split(d): f"the key at depth {d:g} of the filler, at each evaluation length"
            for d in (0.0, 0.25, 0.5, 0.75, 1.0)
        },
    }

    def __init__(
        self,
        *,
        depth: float | None = None,
        n_digits: int = 5,
        eval_lengths: Sequence[int] | str | None = None,
        eval_depths: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0),
    ) -> None:
        if depth is not None:
            check_probability("passkey: depth", depth)
        check_int("passkey: n_digits", n_digits, minimum=1)
        self.depth = None if depth is None else float(depth)
        self.n_digits = n_digits
        self.eval_lengths = parse_eval_lengths("passkey", eval_lengths)
        self.eval_depths = _parse_depths(eval_depths)
        self.tokens = BYTE_NAMES
        self.output_tokens = self.tokens
        self.chance = 10.0
        # A sequence of length + 1 bytes holds at least the key line, its space, the question and key.
        self.min_length = len(KEY_LINE.format(key="0" * n_digits)) + len(QUESTION) + n_digits
        if self.eval_lengths is not None and self.eval_lengths[0] < self.min_length:
            raise ValueError(
                f"passkey: eval_lengths must be at least {self.min_length} with {n_digits} digits, "
                f"got {self.eval_lengths[0]}"
            )

    def splits(self) -> dict[str, dict[str, Any]]:
        splits: dict[str, dict[str, Any]] = {"id": {"depth": self.depth}}
        if self.eval_lengths is not None:
            splits["by_length"] = {"depth": self.depth, "lengths": self.eval_lengths}
            for depth in self.eval_depths:
                splits[depth_split(depth)] = {"depth": depth, "lengths": self.eval_lengths}
        return splits

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        depth: float | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Batch:
        """``batch_size`` texts of ``length`` + 1 bytes with the key at ``depth`` (None: random);
        inputs, targets and mask are (B, ``length``), the mask True on the last ``n_digits``."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("passkey: length", length, minimum=self.min_length)
        if depth is not None:
            check_probability("passkey: depth", depth)
        check_split_length("passkey", length, lengths)
        rng = RandomStream(generator)
        rows = [self._text(rng, length + 1, depth).encode("ascii") for _ in range(batch_size)]
        seq = torch.tensor([list(row) for row in rows], dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        mask[:, length - self.n_digits :] = True
        return Batch(seq[:, :-1], seq[:, 1:], mask)

    def _text(self, rng: RandomStream, n_bytes: int, depth: float | None) -> str:
        key = "".join(str(rng.randint(0, 9)) for _ in range(self.n_digits))
        line = KEY_LINE.format(key=key) + " "
        filler = n_bytes - len(line) - len(QUESTION) - self.n_digits
        before = rng.randint(0, filler) if depth is None else round(depth * filler)
        text = _filler(rng, before, keep_end=True) + line + _filler(rng, filler - before, keep_end=False)
        text += QUESTION + key
        assert len(text) == n_bytes, (len(text), n_bytes)
        return text

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """error and seq_error (Task.metrics) plus accuracy (% of key digits right, pooled) and
        key_accuracy (% of whole keys right)."""
        result = super().metrics(logits, batch)
        result["accuracy"] = 100.0 - result["error"]
        result["key_accuracy"] = 100.0 - result["seq_error"]
        return result


def _filler(rng: RandomStream, n_chars: int, *, keep_end: bool) -> str:
    """``n_chars`` characters of filler sentences: the end of a run of them (``keep_end``: it ends
    with a whole sentence and its separator) or its start."""
    parts: list[str] = []
    total = 0
    while total < n_chars:
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}."
        sentence += "\n" if rng.random() < NEWLINE else " "
        parts.append(sentence)
        total += len(sentence)
    text = "".join(parts)
    return text[len(text) - n_chars :] if keep_end else text[:n_chars]
