"""Shared fixtures: the registry (plus the required compositions) that contract tests run over."""

from __future__ import annotations

import pytest
import torch

import poslab

COMPOSITIONS = ["cope+rope", "cope+t5", "cope+alibi", "cope+relative"]
VARIANTS = [
    "dape[kernel_size=3]",
    "dape[base=kerple_log]",
    "dape[base=fire,kernel_size=3]",
    "dape[base=rope]",
    "dape[base=none]",
    "cope[sep_key=true]",
    "cope[val_gates=true]",
    "rope[scaling=yarn,factor=4,original_max_len=16]",
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


def perturb_parameters(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Move zero-initialised tables (CoPE, relative) off zero so their terms are really exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * 0.1)
