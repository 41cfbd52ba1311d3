"""Language modelling on real text and code (docs/tasks.md, language modelling).

The task wraps `poslab.lab.data` so that the harness (``poslab train``, ``poslab compare``, the presets)
trains a decoder on random windows of a corpus's training documents exactly as it trains on the
synthetic tasks:

    task = build_task("lm", corpus="stdlib", tokenizer="bytes")
    batch = task.sample(32, 128, generator=torch.Generator().manual_seed(0), **task.splits()["id"])
    batch.inputs, batch.targets  # (32, 128) each; targets are the inputs shifted by one token

Every target is scored (the mask is all True). The length-extrapolation evaluation of the DAPE
protocol lives in `poslab.lab.experiments.extrapolation`; it reads the same data through `LMTask.data`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.lab.data.corpora import DEFAULT_FRACTIONS, SPLITS, check_fractions, list_corpora, load_corpus
from poslab.lab.data.token_stream import LMData, build_lm_data
from poslab.lab.data.tokenizers import ByteTokenizer, list_tokenizers
from poslab.lab.parsing import parse_lengths
from poslab.lab.tasks.base import Batch, Task, check_int, register

# One LMData per distinct data configuration per process: tokenizing the stdlib takes ~1 s with
# bytes and much longer with BPE, and every task built from a config (validation, training,
# evaluation, extrapolation) would otherwise redo it.
_DATA_CACHE: dict[str, LMData] = {}

BPE_DEFAULT_VOCAB = 4096  # BPETokenizer.train's default target size


def _check_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"lm: {name} must be a mapping of options, got {value!r}")
    return dict(value)


def _parse_fractions(value: Any) -> tuple[float, float, float]:
    """Split fractions from a sequence or from the command line's ``'0.8,0.1,0.1'``."""
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"lm: fractions must be three numbers such as 0.8,0.1,0.1, got {value!r}"
            ) from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"lm: fractions must be three numbers (train, validation, test), got {value!r}")
    return tuple(float(f) for f in check_fractions(value))  # type: ignore[return-value]


def _parse_eval_lengths(value: Any) -> list[int]:
    """``"128,320"``, a sequence or one length (``task.options.eval_lengths=320``) -> sorted lengths."""
    try:
        return parse_lengths([value] if isinstance(value, int) else value)
    except (TypeError, ValueError):
        raise ValueError(
            f"lm: eval_lengths must be positive integers such as 128,320, got {value!r}"
        ) from None


@register("lm")
class LMTask(Task):
    """Next-token prediction on a text or code corpus, split by document.

    Splits (``splits()``; each is the ``split`` keyword of `sample`):
        id: random windows of the training documents (what the model trains on; evaluated, it
            is the training fit).
        validation, test: random windows of the held-out documents at the same length, or at each
            of ``eval_lengths`` when it is set.

    Determinism: a batch depends only on the generator, the corpus files, the split fractions and
    salt and the tokenizer, so the same seed gives the same windows in every run and process.

    Metrics (`metrics`): loss (mean negative log-likelihood, nats per token), ppl (exp of that
    batch's loss; the harness averages it over batches, which is at least exp of the mean loss) and
    error (% of targets whose argmax is wrong).

    Args:
        corpus: a corpus of `poslab.lab.data` ('stdlib', 'files', 'python_docs', 'austen', 'hf').
        corpus_options: its keyword options, e.g. ``{"path": "notes/"}`` for 'files' or
            ``{"unit": "chapter"}`` for 'austen'.
        tokenizer: 'bytes' (257 ids: bytes and "<eos>") or 'bpe' (trained on the training split).
        tokenizer_options: the tokenizer's options, e.g. ``{"vocab_size": 4096}`` for 'bpe'. The
            model's vocabulary is the requested BPE size (an upper bound of the trained one). BPE is
            retrained from the training split in every process that needs it; the same documents
            give the same vocabulary (checked across processes on a small corpus).
        fractions: train / validation / test fractions of the documents (by a hash of their ids).
        salt: changes the document split while keeping its fractions.
        eval_lengths: lengths the held-out splits are scored at, e.g. ``"128,320"`` (a length
            generalisation test: `poslab.lab.evaluate` reads every window whole, with its full causal
            context, and records each length under results.json's ``metrics["lengths"]``); None: one
            length, ``eval.length`` or the training length. Training ('id') is unaffected.
    """

    causal = True

    def __init__(
        self,
        *,
        corpus: str = "stdlib",
        corpus_options: dict[str, Any] | None = None,
        tokenizer: str = "bytes",
        tokenizer_options: dict[str, Any] | None = None,
        fractions: Sequence[float] | str = DEFAULT_FRACTIONS,
        salt: str = "",
        eval_lengths: Sequence[int] | str | None = None,
    ) -> None:
        if corpus not in list_corpora():
            raise ValueError(f"lm: unknown corpus {corpus!r}; known corpora: {', '.join(list_corpora())}")
        if tokenizer not in list_tokenizers():
            raise ValueError(
                f"lm: unknown tokenizer {tokenizer!r}; known tokenizers: {', '.join(list_tokenizers())}"
            )
        if not isinstance(salt, str):
            raise ValueError(f"lm: salt must be a string, got {salt!r}")
        self.corpus = corpus
        self.corpus_options = _check_mapping("corpus_options", corpus_options)
        self.tokenizer = tokenizer
        self.tokenizer_options = _check_mapping("tokenizer_options", tokenizer_options)
        self.fractions = _parse_fractions(fractions)
        self.salt = salt
        self.eval_lengths = None if eval_lengths is None else tuple(_parse_eval_lengths(eval_lengths))
        if tokenizer == "bytes":
            # Validates the options now (a bad one is a config error, not a mid-run one).
            self._vocab_size = ByteTokenizer(**self.tokenizer_options).vocab_size
        else:
            size = self.tokenizer_options.get("vocab_size", BPE_DEFAULT_VOCAB)
            check_int("lm: tokenizer_options.vocab_size", size, minimum=257)
            self._vocab_size = size
        self.chance = 100.0 / self._vocab_size

    # -- data --------------------------------------------------------------------------------------

    @property
    def data_key(self) -> str:
        """Everything the token streams depend on, as one string (equal keys, equal windows)."""
        return json.dumps(
            {
                "corpus": self.corpus,
                "corpus_options": self.corpus_options,
                "tokenizer": self.tokenizer,
                "tokenizer_options": self.tokenizer_options,
                "fractions": self.fractions,
                "salt": self.salt,
            },
            sort_keys=True,
            default=str,
        )

    @property
    def data(self) -> LMData:
        """The corpus's token streams, built on first use and shared by every task of this process
        with the same `data_key`."""
        key = self.data_key
        if key not in _DATA_CACHE:
            corpus = load_corpus(self.corpus, **self.corpus_options)
            data = build_lm_data(
                corpus,
                tokenizer=self.tokenizer,
                fractions=self.fractions,
                salt=self.salt,
                **self.tokenizer_options,
            )
            if data.vocab_size > self._vocab_size:
                raise ValueError(
                    f"lm: the trained tokenizer has {data.vocab_size} ids, more than the "
                    f"{self._vocab_size} the model was sized for"
                )
            _DATA_CACHE[key] = data
        return _DATA_CACHE[key]

    # -- the Task interface --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def n_outputs(self) -> int:
        return self._vocab_size

    @property
    def tokens(self) -> tuple[str, ...]:  # type: ignore[override]
        """A printable name per id (for `Task.decode`); ids a trained BPE never uses are '<unused>'."""
        tok = self.data.tokenizer
        names = []
        for i in range(self._vocab_size):
            if i >= tok.vocab_size:
                names.append("<unused>")
            elif isinstance(tok, ByteTokenizer) and i < 256:
                names.append(chr(i) if 32 <= i < 127 else f"<0x{i:02X}>")
            else:
                names.append(tok.decode([i]))
        return tuple(names)

    @property
    def output_tokens(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.tokens

    def splits(self) -> dict[str, dict[str, Any]]:
        held = {"lengths": self.eval_lengths} if self.eval_lengths else {}
        return {"id": {"split": "train"}, **{s: {"split": s, **held} for s in SPLITS if s != "train"}}

    def sample(
        self,
        batch_size: int,
        length: int,
        *,
        generator: torch.Generator,
        split: str = "train",
        lengths: Sequence[int] | None = None,
    ) -> Batch:
        """``batch_size`` windows of ``length`` + 1 tokens of ``split`` at uniform random starts
        (``length`` checked against the split's ``lengths`` when given).

        Returns a Batch with inputs = window[:-1], targets = window[1:] (both (B, length)) and an
        all-True mask. Only ``generator`` is drawn from.
        """
        if split not in SPLITS:
            raise ValueError(f"lm: unknown split {split!r}; splits: {', '.join(SPLITS)}")
        if lengths is not None and length not in lengths:
            raise ValueError(f"lm: length {length} is not one of the split's lengths {list(lengths)}")
        inputs, targets = self.data.sample(batch_size, length, generator=generator, split=split)
        return Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool))

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """loss (nats/token), ppl (exp(loss)) and error (% wrong argmax) over the scored targets."""
        correct, mask = self._correct(logits, batch)
        n = int(mask.sum())
        if n == 0:
            return {"loss": math.nan, "ppl": math.nan, "error": math.nan}
        targets = batch.targets.to(logits.device)
        nll = F.cross_entropy(logits.detach().float().flatten(0, 1), targets.flatten(), reduction="none")
        loss = float(nll[mask.flatten()].sum(dtype=torch.float64)) / n
        error = 100.0 * float((~correct & mask).sum()) / n
        return {"loss": loss, "ppl": math.exp(loss), "error": error}

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of a 1-D sequence of ids (the tokenizer's decoding, not space-separated names)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if values and isinstance(values[0], list):
            raise ValueError("decode takes one sequence (a 1-D tensor or list of ids)")
        return self.data.tokenizer.decode(values)

    decode_outputs = decode

    def __repr__(self) -> str:
        return f"LMTask(corpus={self.corpus!r}, tokenizer={self.tokenizer!r}, vocab_size={self.vocab_size})"
