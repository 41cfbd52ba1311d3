"""The task interface: `Batch`, `Task`, the registry and `build_task`.

A task turns (batch size, length, seeded generator, split parameters) into a `Batch` of token ids,
targets and a mask of the scored positions, and scores a model's logits on it (docs/tasks.md).
Two kinds exist:

- causal (decoder) tasks, trained as language models: ``inputs = seq[:-1]``,
  ``targets = seq[1:]``, and ``mask`` marks the scored targets (flip-flop, selective copy,
  counting);
- encoder tasks (the Chomsky-hierarchy tasks): the input tokens are followed by one placeholder
  token per output symbol, and the targets (in the output alphabet) sit at the placeholders.

The mask is the loss mask and the metric mask alike. All metrics are percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from poslab.lab.parsing import check_int as check_int  # re-exported for the task modules
from poslab.lab.parsing import parse_lengths
from poslab.registry import Registry

TASKS: Registry[type[Task]] = Registry("task", "tasks")


@dataclass(frozen=True)
class Batch:
    """One batch of a task; every field is (B, T).

    inputs: token ids fed to the model (int64).
    targets: the target id at every position (int64); only meaningful where ``mask`` is True.
    mask: True where the target is scored, for the loss and the metrics alike (bool).
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        shapes = {self.inputs.shape, self.targets.shape, self.mask.shape}
        if len(shapes) != 1 or self.inputs.dim() != 2:
            raise ValueError(f"Batch fields must share one (B, T) shape, got {sorted(shapes)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"Batch.mask must be bool, got {self.mask.dtype}")

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


class Task:
    """Base class of the synthetic tasks.

    Class attributes a subclass sets:
        name: the registry name (set by `register`).
        causal: True for decoder (next-token) tasks, False for encoder tasks.
        headline: the metric a results table shows ('error', lower is better, or 'accuracy').
        split_notes: what each split is, one short phrase each, printed under results tables.
    Instance attributes set by the constructor:
        tokens: the name of every input id, ``tokens[i]`` for id i (used by `decode`).
        output_tokens: the name of every output id (the same as ``tokens`` for causal tasks).
        vocab_size: ``len(tokens)``; n_outputs: ``len(output_tokens)``, the size of the output head.
        chance: per-token accuracy of uniform guessing on the scored positions, in percent.
    """

    name: ClassVar[str] = ""
    causal: ClassVar[bool] = True
    headline: ClassVar[str] = "error"
    split_notes: ClassVar[dict[str, str]] = {}

    tokens: tuple[str, ...]
    output_tokens: tuple[str, ...]
    chance: float

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def n_outputs(self) -> int:
        return len(self.output_tokens)

    def splits(self) -> dict[str, dict[str, Any]]:
        """Named splits -> keyword arguments for `sample`; the training split is ``"id"``."""
        raise NotImplementedError

    def split_lengths(self, split: str) -> Sequence[int] | None:
        """The lengths split ``split`` ranges over (``splits()[split]["lengths"]``; training draws
        one per batch, evaluation scores each), or None for a split at one fixed length."""
        return self.splits()[split].get("lengths")

    def sample(
        self, batch_size: int, length: int, *, generator: torch.Generator, **split_params: Any
    ) -> Batch:
        """A batch drawn with ``generator`` (a CPU generator) only, so its seed fixes the data."""
        raise NotImplementedError

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """Percent errors of ``logits`` (B, T, n_outputs) on the scored positions of ``batch``.

        error: % of scored tokens whose argmax is wrong.
        seq_error: % of sequences (among those with a scored token) with any wrong scored token.
        Both are NaN when nothing in the batch is scored.
        """
        correct, mask = self._correct(logits, batch)
        wrong = ~correct & mask
        scored_rows = mask.any(dim=1)
        error = 100.0 * wrong.sum().item() / mask.sum().item() if mask.any() else float("nan")
        n_rows = scored_rows.sum().item()
        seq_error = 100.0 * wrong.any(dim=1).sum().item() / n_rows if n_rows else float("nan")
        return {"error": error, "seq_error": seq_error}

    def _correct(self, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(argmax == target, mask), both (B, T), after checking the logits' shape."""
        expected = (*batch.targets.shape, self.n_outputs)
        if tuple(logits.shape) != expected:
            raise ValueError(f"logits must have shape {expected}, got {tuple(logits.shape)}")
        correct = logits.detach().argmax(dim=-1) == batch.targets.to(logits.device)
        return correct, batch.mask.to(logits.device)

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Input ids (a 1-D sequence) as space-separated token names."""
        return _join(self.tokens, ids)

    def decode_outputs(self, ids: Tensor | Iterable[int]) -> str:
        """Output (target) ids as space-separated token names."""
        return _join(self.output_tokens, ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _join(names: Sequence[str], ids: Tensor | Iterable[int]) -> str:
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if values and isinstance(values[0], list):
        raise ValueError("decode takes one sequence (a 1-D tensor or list of ids)")
    return " ".join(names[i] for i in values)


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task to the registry under ``name``."""

    def wrap(cls: type[Task]) -> type[Task]:
        TASKS.add(name, cls)
        cls.name = name
        return cls

    return wrap


def list_tasks() -> list[str]:
    """Names of all registered tasks."""
    return TASKS.names()


def build_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with keyword ``options`` for its constructor."""
    return TASKS.build(name, **options)


# -- helpers shared by the task modules ------------------------------------------------------------


def check_probability(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` unless 0 <= ``value`` <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def parse_eval_lengths(task: str, value: Any) -> tuple[int, ...] | None:
    """A task's ``eval_lengths`` option: ``"256,512"``, a sequence or one length -> sorted lengths
    (None stays None: no length sweep)."""
    if value is None:
        return None
    try:
        return tuple(parse_lengths([value] if isinstance(value, int) else value))
    except (TypeError, ValueError):
        raise ValueError(
            f"{task}: eval_lengths must be positive integers such as 256,512, got {value!r}"
        ) from None


def check_split_length(task: str, length: int, lengths: Sequence[int] | None) -> None:
    """ValueError unless ``length`` is one of a length split's ``lengths`` (None: any length)."""
    if lengths is not None and length not in lengths:
        raise ValueError(f"{task}: length {length} is not one of the split's lengths {list(lengths)}")


BYTE_NAMES = tuple(chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in range(256))
"""A printable name per byte id (the byte-level tasks' ``tokens``)."""


class RandomStream:
    """Python-side random numbers drawn in chunks from a torch.Generator.

    Samplers that are easiest to write as plain Python loops (bracketed expressions, programs) take
    their draws from here: one seed still fixes the data, and a chunked draw costs far less than one
    torch call per number.
    """

    def __init__(self, generator: torch.Generator, chunk: int = 4096) -> None:
        self._generator = generator
        self._chunk = chunk
        self._buffer: list[float] = []
        self._next = 0

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if self._next == len(self._buffer):
            draw = torch.rand(self._chunk, dtype=torch.float64, generator=self._generator)
            self._buffer, self._next = draw.tolist(), 0
        self._next += 1
        return self._buffer[self._next - 1]

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high], both ends included (like `random.randint`)."""
        return low + int(self.random() * (high - low + 1))

    def choice(self, options: Sequence[Any]) -> Any:
        return options[int(self.random() * len(options))]

    def weighted(self, weights: Sequence[float]) -> int:
        """An index drawn with probability proportional to ``weights``."""
        u, total = self.random() * sum(weights), 0.0
        for i, w in enumerate(weights):
            total += w
            if u < total:
                return i
        return len(weights) - 1
