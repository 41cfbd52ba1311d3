"""Language-modelling data and the length-extrapolation evaluation of the DAPE protocol.

The protocol (docs/tasks.md): train at length L on random windows of the training split; evaluate at
L, 2L, ..., 64L on non-overlapping windows of held-out documents with the full causal context, and
report the perplexity of the last 256 tokens of each window (the DAPE paper's headline,
arXiv 2405.14722) and of all tokens.

    data = build_lm_data(load_corpus("stdlib"), tokenizer="bytes", run_dir="runs/x")
    inputs, targets = data.sample(32, 128, generator=torch.Generator().manual_seed(0))  # (B, L)
    windows = data.eval_windows(1024, split="validation", max_windows=64)             # (W, T + 1)
    result = perplexity(lambda x: model(x), windows, last=256)

A split's token stream is its documents, sorted by id, each tokenized and followed by the
tokenizer's "<eos>" id, concatenated. The evaluation windows are a pure function of (corpus files,
split fractions and salt, tokenizer, T, max_windows), so every position encoding is scored on the
very same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from poslab.lab.data.corpora import DEFAULT_FRACTIONS, SPLITS, Corpus, Document
from poslab.lab.data.tokenizers import (
    TOKENIZER_FILE,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

HEADLINE_LAST = 256  # the DAPE paper scores the last 256 tokens of each window
TOKENS_FILE = "tokens.pt"


def encode_documents(tokenizer: Tokenizer, documents: Sequence[Document]) -> Tensor:
    """One token stream (N,) int32: each document's ids followed by ``tokenizer.eos_id``.

    Without an "<eos>" token the documents are simply concatenated.
    """
    pieces = tokenizer.encode_batch([d.text for d in documents])
    if tokenizer.eos_id is not None:
        eos = np.array([tokenizer.eos_id], dtype=np.int64)
        pieces = [part for piece in pieces for part in (piece, eos)]
    if not pieces:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.concatenate(pieces).astype(np.int32))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sample_windows(
    stream: Tensor, batch_size: int, length: int, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A training batch: ``batch_size`` windows of ``length + 1`` tokens at uniform random starts.

    stream: (N,) token ids. Returns (inputs, targets), both (B, L) int64, targets = inputs shifted
    by one. Only ``generator`` (a CPU generator) is drawn from, so its seed fixes the batches.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("length", length)
    n_starts = stream.numel() - length
    if n_starts < 1:
        raise ValueError(
            f"a training window of {length + 1} tokens does not fit in a stream of {stream.numel()} tokens"
        )
    starts = torch.randint(n_starts, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(length + 1)  # (B, L + 1)
    windows = stream[index].long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream: Tensor, length: int, *, max_windows: int | None = None) -> Tensor:
    """Non-overlapping evaluation windows (W, T + 1) of a held-out stream, T = ``length``.

    Window k is ``stream[k (T + 1) : (k + 1)(T + 1)]``; the tail shorter than T + 1 is dropped.
    Each window is scored with inputs ``w[:-1]`` and targets ``w[1:]``, all T targets having the
    whole window before them as causal context. With ``max_windows`` below the number available,
    that many windows evenly spaced over the stream are kept (still non-overlapping and spread
    over many documents rather than the first few).
    """
    _check_positive("length", length)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    n_available = stream.numel() // (length + 1)
    if n_available == 0:
        raise ValueError(
            f"the held-out stream ({stream.numel()} tokens) is shorter than one evaluation window "
            f"of {length + 1} tokens"
        )
    windows = stream[: n_available * (length + 1)].view(n_available, length + 1)
    if max_windows is not None and max_windows < n_available:
        keep = torch.linspace(0, n_available - 1, max_windows, dtype=torch.float64).round().long()
        windows = windows[keep]
    return windows.long()


@dataclass(frozen=True)
class Perplexity:
    """Result of `perplexity` on W windows of T + 1 tokens.

    last / all: exp of the mean negative log-likelihood (nats) of the scored targets: the last
    ``n_last`` targets of each window, or all T. nll_last / nll_all: those means.
    n_tokens_last / n_tokens_all: how many targets each covers (W * min(last, T), W * T).
    """

    last: float
    all: float
    nll_last: float
    nll_all: float
    n_tokens_last: int
    n_tokens_all: int
    n_windows: int
    length: int
    n_last: int


@torch.no_grad()
def perplexity(
    model_fn: Callable[[Tensor], Tensor],
    windows: Tensor,
    *,
    last: int = HEADLINE_LAST,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> Perplexity:
    """Perplexity of ``model_fn`` on evaluation windows, over the last ``last`` targets and all.

    model_fn: inputs (B, T) int64 -> logits (B, T, V), next-token logits at every position.
    windows: (W, T + 1) from `eval_windows`. last: how many final targets of each window the
    headline counts (all T when T <= last). batch_size: windows per model call. device: where the
    inputs go (logits may come back anywhere). Streaming: only the summed negative log-likelihoods
    (float64) and the token counts are kept between batches; the log-softmax is taken in float32
    at least.
    """
    _check_positive("last", last)
    _check_positive("batch_size", batch_size)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (W, T + 1) with T >= 1, got {tuple(windows.shape)}")
    n_windows, length = windows.shape[0], windows.shape[1] - 1
    n_last = min(last, length)
    nll_all = nll_last = 0.0
    for start in range(0, n_windows, batch_size):
        chunk = windows[start : start + batch_size]
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        if device is not None:
            inputs = inputs.to(device)
        logits = model_fn(inputs)
        expected = (chunk.shape[0], length)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
            raise ValueError(
                f"model_fn must return logits (B, T, V) = ({expected[0]}, {expected[1]}, V), "
                f"got {tuple(logits.shape)}"
            )
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        targets = targets.to(logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
        nll_all += nll.sum(dtype=torch.float64).item()
        nll_last += nll[:, length - n_last :].sum(dtype=torch.float64).item()
    n_tokens_all, n_tokens_last = n_windows * length, n_windows * n_last
    mean_all, mean_last = nll_all / n_tokens_all, nll_last / n_tokens_last
    return Perplexity(
        last=float(np.exp(mean_last)),
        all=float(np.exp(mean_all)),
        nll_last=mean_last,
        nll_all=mean_all,
        n_tokens_last=n_tokens_last,
        n_tokens_all=n_tokens_all,
        n_windows=n_windows,
        length=length,
        n_last=n_last,
    )


@dataclass(frozen=True)
class LMData:
    """The token streams of a corpus's three splits and the tokenizer that made them.

    streams: split name -> (N,) int32 token ids (documents sorted by id, each followed by "<eos>").
    n_documents: split name -> how many documents it holds.
    """

    corpus: str
    tokenizer: Tokenizer
    streams: dict[str, Tensor]
    n_documents: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def stream(self, split: str) -> Tensor:
        if split not in self.streams:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(self.streams)}")
        stream = self.streams[split]
        if stream.numel() == 0:
            raise ValueError(
                f"the {split} split of corpus {self.corpus!r} is empty "
                f"({self.n_documents.get(split, 0)} documents); choose other split fractions "
                f"(or, for a corpus of few documents, smaller documents)"
            )
        return stream

    def sample(
        self, batch_size: int, length: int, *, generator: torch.Generator, split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (B, L) int64: random windows of the training stream."""
        return sample_windows(self.stream(split), batch_size, length, generator=generator)

    def eval_windows(
        self, length: int, *, split: str = "validation", max_windows: int | None = None
    ) -> Tensor:
        """(W, T + 1) non-overlapping windows of a held-out split; see `eval_windows`."""
        return eval_windows(self.stream(split), length, max_windows=max_windows)

    def summary(self) -> dict[str, dict[str, int]]:
        """Documents and tokens per split (for run logs)."""
        return {
            split: {"documents": self.n_documents.get(split, 0), "tokens": s.numel()}
            for split, s in self.streams.items()
        }


def build_lm_data(
    corpus: Corpus,
    *,
    tokenizer: str | Tokenizer = "bytes",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    salt: str = "",
    run_dir: str | Path | None = None,
    cache_tokens: bool = False,
    **tokenizer_options: object,
) -> LMData:
    """Split ``corpus`` by document, get a tokenizer and tokenize each split.

    tokenizer: a name for `build_tokenizer` ("bytes", or "bpe", trained on the training split with
    ``tokenizer_options`` such as ``vocab_size``) or a ready `Tokenizer`. run_dir: when it already
    holds a tokenizer.json, that tokenizer is loaded (so an evaluation uses the training run's
    vocabulary; ``tokenizer_options`` are then unused); otherwise the tokenizer is saved there.
    cache_tokens: keep the token streams in ``run_dir/tokens.pt``, reused while the tokenizer and
    every split's document ids and texts are unchanged (checked by a sha256 of all of them). Worth
    it for BPE: on 2 CPU cores it encodes the 12 MB stdlib in ~10-20 s; bytes take under 1 s.
    """
    if cache_tokens and run_dir is None:
        raise ValueError("cache_tokens=True needs a run_dir to keep the tokens in")
    parts = corpus.split(fractions, salt=salt)
    saved = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif saved is not None and saved.is_file():
        tok = load_tokenizer(saved.parent)
        if tok.name != tokenizer:
            raise ValueError(f"{saved} holds a {tok.name!r} tokenizer, not the {tokenizer!r} asked for")
    else:
        tok = build_tokenizer(tokenizer, texts=[d.text for d in parts["train"]], **tokenizer_options)
    if saved is not None and not saved.is_file():
        tok.save(saved.parent)
    streams = None
    if cache_tokens:
        cache = Path(run_dir) / TOKENS_FILE  # type: ignore[arg-type]
        key = _content_key(tok, parts)
        if cache.is_file():
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == key:
                streams = stored["streams"]
    if streams is None:
        streams = {split: encode_documents(tok, parts[split]) for split in SPLITS}
        if cache_tokens:
            torch.save({"key": key, "streams": streams}, cache)
    return LMData(
        corpus=corpus.name,
        tokenizer=tok,
        streams=streams,
        n_documents={split: len(parts[split]) for split in SPLITS},
    )


def _content_key(tokenizer: Tokenizer, parts: dict[str, list[Document]]) -> str:
    """sha256 of the tokenizer and of every split's document ids and texts, length-prefixed."""
    digest = hashlib.sha256(tokenizer.to_json().encode("utf-8"))
    for split in SPLITS:
        digest.update(split.encode())
        for doc in parts[split]:
            for field_bytes in (doc.id.encode("utf-8"), doc.text.encode("utf-8")):
                digest.update(len(field_bytes).to_bytes(8, "little"))
                digest.update(field_bytes)
    return digest.hexdigest()
