"""Presets of language models for length extrapolation (the DAPE protocol, docs/tasks.md).

Each sets ``eval.extrapolate_to``, the largest length `poslab lm-extrapolation` scores (L, 2L, ...
up to it); the paper evaluates both of its training lengths up to 8192, and ``--max-len`` raises it
(64L = 32768 for lm_paper_512).
"""

from __future__ import annotations

from typing import Any

from poslab.lab.config import EvalConfig, ModelSpec, RunConfig, TaskConfig, TrainConfig
from poslab.lab.presets.registry import preset


def _lm_task(train_len: int, **options: Any) -> TaskConfig:
    return TaskConfig(
        name="lm", options={"corpus": "stdlib", "tokenizer": "bytes", **options}, train_len=train_len
    )


@preset(
    "lm_stdlib_small",
    "CPU, 1-3 min a run on 1 thread: 2 layers d 128, bytes of the Python stdlib at 128 tokens",
)
def lm_stdlib_small() -> RunConfig:
    # Sized on 2 shared CPU cores, 1 thread: 600 steps of batch 16 at 128 tokens took 65 s (ALiBi)
    # to 178 s (CoPE) per run, 25 minutes for 7 encodings x 2 seeds (docs/results/history/lm_extrapolation).
    return RunConfig(
        model=ModelSpec(d_model=128, n_layers=2, n_heads=4, norm="pre", encoding="rope", max_len=128),
        task=_lm_task(128),
        train=TrainConfig(
            steps=600,
            batch_size=16,
            lr=3e-3,
            warmup=50,
            weight_decay=0.1,
            loss="all",
            log_every=50,
            eval_every=0,
            checkpoint_every=200,
        ),
        eval=EvalConfig(splits=("id", "validation"), batches=4, batch_size=32, extrapolate_to=4096),
    )


# The DAPE scale study (`poslab lm-study dape_scale`): lm_stdlib_small widened, all else equal (4 heads,
# 2 layers, the same steps, batch and learning rate), so that only the parameter count changes.
@preset("lm_stdlib_x4", "CPU: lm_stdlib_small at d 256, about 4x its parameters (1.7M), 4-6 min a run")
def lm_stdlib_x4() -> RunConfig:
    return lm_stdlib_small().override({"model.d_model": 256})


@preset("lm_stdlib_x16", "CPU: lm_stdlib_small at d 512, about 14x its parameters (6.6M), 15-25 min a run")
def lm_stdlib_x16() -> RunConfig:
    return lm_stdlib_small().override({"model.d_model": 512})


def _paper(train_len: int) -> RunConfig:
    # The DAPE paper's 125M decoder (12 layers, d 768, 12 heads), trained at 128 or 512. The stdlib
    # holds ~11M training bytes, little for 125M parameters: point task.options.corpus at a larger
    # corpus ('files', 'hf') for a faithful run.
    return RunConfig(
        model=ModelSpec(d_model=768, n_layers=12, n_heads=12, norm="pre", encoding="rope", max_len=train_len),
        task=_lm_task(train_len),
        train=TrainConfig(
            steps=20000,
            batch_size=32,
            lr=6e-4,
            warmup=1000,
            weight_decay=0.1,
            loss="all",
            log_every=100,
            eval_every=2000,
            checkpoint_every=1000,
        ),
        eval=EvalConfig(splits=("id", "validation"), batches=8, batch_size=16, extrapolate_to=8192),
    )


@preset("lm_paper_128", "GPU: the DAPE paper's 125M decoder (12 layers d 768), trained at 128, eval to 8192")
def lm_paper_128() -> RunConfig:
    return _paper(128)


@preset("lm_paper_512", "GPU: the DAPE paper's 125M decoder (12 layers d 768), trained at 512, eval to 8192")
def lm_paper_512() -> RunConfig:
    return _paper(512)
