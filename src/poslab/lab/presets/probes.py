"""Presets of the length-generalisation probes: pass key, MQAR and repeated text (docs/tasks.md,
"Length-generalisation probes"). One CPU decoder, one schedule and one evaluation grid for every
encoding: trained at 128 tokens, scored at 1x, 2x, ..., 32x (128 ... 4096 tokens)."""

from __future__ import annotations

from poslab.lab.config import EvalConfig, ModelSpec, RunConfig, TaskConfig, TrainConfig
from poslab.lab.presets.registry import preset

TRAIN_LEN = 128
EVAL_LENGTHS = (128, 256, 512, 1024, 2048, 4096)  # 1x .. 32x the training length

# The calibrated CPU model and schedule (docs/tasks.md, "Calibration of the probes"), the same for
# every encoding and every probe; model.max_len covers the longest evaluation for the encodings
# with a table (learned absolute), which are then scored at every length rather than refused.
PROBE_MODEL = dict(d_model=64, n_layers=2, n_heads=4, norm="pre", encoding="rope", max_len=4096)
PROBE_TRAIN = dict(steps=1000, batch_size=32, lr=3e-3, warmup=100, grad_clip=1.0, eval_every=0)
# Evaluation: 16 sequences per (split, length) cell, in batches of 8 (4096-token attention maps).
PROBE_EVAL = dict(batches=2, batch_size=8)


def _probe(task: TaskConfig) -> RunConfig:
    return RunConfig(
        model=ModelSpec(**PROBE_MODEL),
        task=task,
        train=TrainConfig(**PROBE_TRAIN),
        eval=EvalConfig(**PROBE_EVAL),
    )


@preset("passkey_small", "CPU, minutes: pass key at 128 bytes, scored at 128..4096 (depth x length grid)")
def passkey_small() -> RunConfig:
    return _probe(TaskConfig(name="passkey", options={"eval_lengths": EVAL_LENGTHS}, train_len=TRAIN_LEN))


@preset("mqar_small", "CPU, minutes: MQAR at 128 tokens (8 pairs), scored at 128..4096 (256 pairs)")
def mqar_small() -> RunConfig:
    # 16 tokens a pair: 8 pairs at 128 tokens, 256 at 4096 (all of n_keys); 64 values (chance 1.6%).
    options = {"n_keys": 256, "n_values": 64, "tokens_per_pair": 16, "eval_lengths": EVAL_LENGTHS}
    return _probe(TaskConfig(name="mqar", options=options, train_len=TRAIN_LEN))


@preset("repeated_text_small", "CPU, minutes: stdlib text repeated at 128 bytes, scored at 128..4096")
def repeated_text_small() -> RunConfig:
    return _probe(
        TaskConfig(name="repeated_text", options={"eval_lengths": EVAL_LENGTHS}, train_len=TRAIN_LEN)
    )
