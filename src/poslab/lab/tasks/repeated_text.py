"""Repeated text: a chunk of real text (bytes), optionally an unrelated gap, then the chunk again;
the second copy is scored. The copying circuit is the induction head (Olsson et al., "In-context
Learning and Induction Heads", 2022), which here must look back exactly one copy distance.

A length-generalisation probe: the copy distance is half to three quarters of the sequence (it
varies from one sequence to the next, so the copy is a look-up by content), so a model trained
on short sequences and tested on long ones must attend, by content, to a token further back than
any it was trained on; the loss on the second copy shows how far its copying reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.lab.tasks.base import (
    BYTE_NAMES,
    Batch,
    Task,
    check_int,
    check_probability,
    check_split_length,
    parse_eval_lengths,
    register,
)


@register("repeated_text")
class RepeatedText(Task):
    """``<chunk of c1 bytes> <gap of g bytes> <the chunk's first c2 bytes>``, ``length`` + 1 bytes.

    The chunk and the gap are windows at uniform random starts of the corpus's byte stream (the
    ``lm`` task's data: documents split into train / validation / test by a hash of their name,
    each followed by ``<eos>``), the gap from a start of its own. Per sequence, g is uniform in
    0..round(``gap`` * (``length`` + 1)), c1 = ceil((``length`` + 1 - g) / 2) and c2 = ``length``
    + 1 - g - c1 (c1 or c1 - 1), so the copy distance, from a byte to its repeat, is c1 + g: from
    half the sequence to (1 + ``gap``) / 2 of it. A distance that varies within a length is what
    makes the copy a look-up by content (an induction head): at one fixed distance a head that
    attends a fixed offset back would copy as well, and learn nothing about longer ones. A batch is
    (B, ``length``). Scored: every byte of the second copy but its first (which nothing announces),
    c2 - 1 targets a sequence; ``accuracy`` (% right, pooled) and ``loss`` (mean cross-entropy in
    nats of the scored bytes, the copy's surprise) besides error and seq_error; ``first_accuracy``,
    ``first_loss`` and ``copy_gain`` compare them with the same bytes in the chunk (`metrics`).

    Tokens: bytes 0..255 and ``<eos>`` = 256 (257 ids, as the ``lm`` task with ``bytes``). Chance is
    1/257. Splits: ``id`` (training documents, at the training length) and, with ``eval_lengths``,
    ``by_length`` (held-out validation documents at each of those lengths).

    Args:
        corpus: an ``lm`` corpus (default ``stdlib``, the running Python's standard library: present
            on every machine).
        corpus_options: the corpus loader's options.
        gap: the largest share of a sequence given to an unrelated window between the copies, in
            [0, 0.9]; 0 puts the copies side by side at one fixed distance.
        eval_lengths: the lengths of the ``by_length`` split, e.g. ``"128,256,512"``.
    """

    causal = True
    headline = "accuracy"
    split_notes = {
        "id": "training documents at the training length",
        "by_length": "held-out documents at each evaluation length (copy distance about half to 3/4 of it)",
    }

    def __init__(
        self,
        *,
        corpus: str = "stdlib",
        corpus_options: dict[str, Any] | None = None,
        gap: float = 0.5,
        eval_lengths: Sequence[int] | str | None = None,
    ) -> None:
        from poslab.lab.tasks.language_modelling import LMTask  # the corpus's byte streams

        check_probability("repeated_text: gap", gap)
        if gap > 0.9:
            raise ValueError(f"repeated_text: gap must be at most 0.9, got {gap!r}")
        self.gap = float(gap)
        self.eval_lengths = parse_eval_lengths("repeated_text", eval_lengths)
        self.lm = LMTask(corpus=corpus, corpus_options=corpus_options, tokenizer="bytes")
        self.tokens = (*BYTE_NAMES, "<eos>")
        self.output_tokens = self.tokens
        self.chance = 100.0 / len(self.tokens)

    def layout(self, length: int, gap: int) -> tuple[int, int]:
        """(c1, c2): the chunk and second-copy lengths of ``length`` + 1 bytes with a ``gap``."""
        first = math.ceil((length + 1 - gap) / 2)
        return first, length + 1 - gap - first

    def splits(self) -> dict[str, dict[str, Any]]:
        splits: dict[str, dict[str, Any]] = {"id": {"split": "train"}}
        if self.eval_lengths is not None:
            splits["by_length"] = {"split": "validation", "lengths": self.eval_lengths}
        return splits

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        split: str = "train",
        lengths: Sequence[int] | None = None,
    ) -> Batch:
        """``batch_size`` sequences of ``length`` + 1 bytes from ``split``'s documents; inputs,
        targets and mask are (B, ``length``), the mask True on the second copy but its first byte."""
        check_int("batch_size", batch_size, minimum=1)
        check_int("repeated_text: length", length, minimum=3)  # at least one scored byte
        check_split_length("repeated_text", length, lengths)
        stream = self.lm.data.stream(split)
        top = min(round(self.gap * (length + 1)), length - 2)  # leaves c2 >= 2
        gaps = torch.randint(0, top + 1, (batch_size,), generator=generator).tolist()
        seq = torch.empty(batch_size, length + 1, dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        for b, gap in enumerate(gaps):
            first, second = self.layout(length, gap)
            chunk = _window(stream, first, generator)
            seq[b] = torch.cat([chunk, _window(stream, gap, generator), chunk[:second]])
            mask[b, first + gap :] = True  # targets first + gap .. length - 1: the copy's bytes 1..c2 - 1
        return Batch(seq[:, :-1], seq[:, 1:], mask)

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """error and seq_error (Task.metrics), accuracy (% of scored bytes right, pooled) and loss
        (mean cross-entropy in nats over the scored bytes); and the same bytes read the first time,
        in the chunk, where nothing announces them: ``first_accuracy`` and ``first_loss``, the
        level of a model that does not copy (it predicts text from the bytes nearby), and
        ``copy_gain`` = accuracy - first_accuracy, what copying adds."""
        result = super().metrics(logits, batch)
        result["accuracy"] = 100.0 - result["error"]
        right, mask = self._correct(logits, batch)
        targets = batch.targets.to(logits.device)
        # A row's first scored target is at the copy distance d (`sample`), and its target there is
        # the chunk's byte 1, as the target at 0 is: scored byte p repeats the target at p - d.
        length = mask.shape[1]
        distance = mask.int().argmax(dim=1, keepdim=True)
        first = mask.any(dim=1, keepdim=True) & (torch.arange(length, device=mask.device) < length - distance)
        for prefix, where in (("", mask), ("first_", first)):
            scored = logits.detach()[where].float()
            result[prefix + "loss"] = (
                F.cross_entropy(scored, targets[where]).item() if where.any() else math.nan
            )
        result["first_accuracy"] = 100.0 * right[first].float().mean().item() if first.any() else math.nan
        result["copy_gain"] = result["accuracy"] - result["first_accuracy"]
        return result


def _window(stream: Tensor, width: int, generator: torch.Generator) -> Tensor:
    """``width`` int64 tokens of ``stream`` from a uniform random start."""
    if stream.numel() < width:
        raise ValueError(f"repeated_text: a window of {width} bytes does not fit in {stream.numel()} bytes")
    start = int(torch.randint(stream.numel() - width + 1, (1,), generator=generator))
    return stream[start : start + width].long()
