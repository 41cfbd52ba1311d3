"""Shared fixtures: the registry (plus the required compositions) that contract tests run over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through triton's interpreter, which triton reads when it is
# first imported; transformers and torch may import it before tests/kernels/test_triton.py is
# collected, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import poslab

COMPOSITIONS = [
    "cope+rope",
    "cope+t5",
    "cope+alibi",
    "cope+relative",
    "fox+rope",
    "stickbreaking+alibi",
    "selective+rope",
]
VARIANTS = [
    "dape[kernel_size=3]",
    "dape[base=kerple_log]",
    "dape[base=fire,kernel_size=3]",
    "dape[base=rope]",
    "dape[base=none]",
    "cope[sep_key=true]",
    "cope[val_gates=true]",
    "rope[scaling=yarn,factor=4,original_max_len=16]",
    "stickbreaking[attend_current=true]",
    "pope[dim=4,bias_uniform_init=true]",
    # dynamic and longrope change at original_max_len: 20 keeps the cached-decoding contracts (17
    # tokens) on one side of it, while the 24- and 128-token tests run past it
    # (tests/encodings/test_rope.py covers decoding across it).
    "rope[scaling=dynamic,factor=4,original_max_len=20]",
    "rope[scaling=llama3,factor=8,original_max_len=16]",
    "rope[scaling=longrope,factor=4,original_max_len=20,short_factor=1.5,long_factor=4]",
    "rope[partial=0.5]",
    "rope[p=0.5]",
]
ALL_ENCODINGS = poslab.list_encodings() + COMPOSITIONS + VARIANTS


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contending ones (modules that train use
    it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(encoding: str, *, causal: bool = True, **overrides) -> poslab.ModelConfig:
    options = dict(
        vocab_size=13,
        d_model=32,
        n_layers=2,
        n_heads=4,
        encoding=encoding,
        causal=causal,
        max_len=256,
    )
    options.update(overrides)
    return poslab.ModelConfig(**options)


def extra_keys_for(encoding: poslab.PositionEncoding, x: torch.Tensor, queries: torch.Tensor):
    """What a model passes to ``attend`` as ``extra_keys``: ``input_keys(x)``, or the queries of every
    key position for encodings with ``queries_as_extra_keys`` (selective), or None."""
    if "input_keys" not in encoding.hooks:
        return None
    return queries if encoding.queries_as_extra_keys else encoding.input_keys(x)


def decoder_only(name: str, causal: bool) -> bool:
    """True when ``name`` is defined for decoders only and ``causal`` is False, after checking that an
    encoder with it refuses to run with a clear error (``PositionEncoding.check_mode``)."""
    if causal or poslab.build_encoding(name, n_heads=4, head_dim=8).supports_bidirectional:
        return False
    model = poslab.build_model(tiny_config(name, causal=False))
    with pytest.raises(ValueError, match="not defined for bidirectional"):
        model(torch.randint(0, 13, (1, 4)))
    return True


def perturb_parameters(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Move zero-initialised tables (CoPE, relative) off zero so their terms are really exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * 0.1)


CORPUS_WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "from", "home"]


def write_corpus(root: Path, n_docs: int = 40) -> Path:
    """Text files of pseudo-random sentences: a corpus small enough for tests."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for d in range(n_docs):
        sentences = []
        for _ in range(12):
            n = int(torch.randint(4, 9, (1,), generator=g))
            words = [CORPUS_WORDS[int(i)] for i in torch.randint(0, len(CORPUS_WORDS), (n,), generator=g)]
            sentences.append(" ".join(words).capitalize() + ".")
        (root / f"doc{d:03d}.txt").write_text(" ".join(sentences) + "\n")
    return root


def tiny_lm_overrides(corpus: Path) -> list[str]:
    """Overrides of `lm_stdlib_small` for a language model of a few seconds on ``corpus``."""
    return [
        "task.options.corpus=files",
        f"task.options.corpus_options.path={corpus}",
        "task.options.fractions=0.6,0.2,0.2",
        "task.train_len=16",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_len=16",
        "train.steps=3",
        "train.batch_size=4",
        "train.warmup=1",
        "train.checkpoint_every=0",
        "train.device=cpu",
        "eval.batches=1",
        "eval.batch_size=4",
    ]
