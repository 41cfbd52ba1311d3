"""Presets of the length-generalisation probes: pass key, MQAR and repeated text (docs/tasks.md,
"Length-generalisation probes"). One CPU decoder, optimiser and evaluation grid for every probe
and encoding: trained at 128 tokens, scored at 1x, 2x, ..., 32x (128 ... 4096 tokens); only the
number of steps is the probe's own (the same for every encoding)."""

from __future__ import annotations

from poslab.lab.config import EvalConfig, ModelSpec, RunConfig, TaskConfig, TrainConfig
from poslab.lab.presets.registry import preset

TRAIN_LEN = 128
# 1x .. 32x the training length; a list, as a config's JSON gives it back (a tuple would not compare
# equal after the round trip).
EVAL_LENGTHS = [128, 256, 512, 1024, 2048, 4096]

# The calibrated CPU model and optimiser (docs/tasks.md, "Calibration of the probes"), the same for
# every encoding and every probe; model.max_len covers the longest evaluation for the encodings
# with a table (learned absolute), which are then scored at every length rather than refused.
PROBE_MODEL = dict(d_model=64, n_layers=2, n_heads=4, norm="pre", encoding="rope", max_len=4096)
PROBE_TRAIN = dict(batch_size=32, lr=3e-3, warmup=100, grad_clip=1.0, eval_every=0)
# Evaluation: 16 sequences per (split, length) cell, in batches of 8 (4096-token attention maps).
PROBE_EVAL = dict(batches=2, batch_size=8)


def _probe(task: TaskConfig, steps: int) -> RunConfig:
    return RunConfig(
        model=ModelSpec(**PROBE_MODEL),
        task=task,
        train=TrainConfig(steps=steps, checkpoint_every=500, **PROBE_TRAIN),
        eval=EvalConfig(**PROBE_EVAL),
    )


@preset(
    "passkey_small", "CPU, ~4 min: pass key at 128 bytes, 2000 steps, scored at 128..4096 (depth x length)"
)
def passkey_small() -> RunConfig:
    # 2000 steps: at 1000, RoPE reached 90% of the digits (56% of whole keys) at 128 bytes.
    return _probe(
        TaskConfig(name="passkey", options={"eval_lengths": EVAL_LENGTHS}, train_len=TRAIN_LEN), steps=2000
    )


@preset("mqar_small", "CPU, minutes: MQAR at 128 tokens (32 pairs), scored at 128..4096 (1024 pairs)")
def mqar_small() -> RunConfig:
    # 4 tokens a pair, no filler between queries: 32 queries a sequence of 128 tokens, the most
    # training signal per token; 1024 keys cover the 1024 pairs of 4096 tokens; 64 values.
    options = {"n_keys": 1024, "n_values": 64, "tokens_per_pair": 4, "eval_lengths": EVAL_LENGTHS}
    return _probe(TaskConfig(name="mqar", options=options, train_len=TRAIN_LEN), steps=2000)


@preset(
    "repeated_text_small", "CPU, ~2 min: stdlib text repeated at 128 bytes, 1000 steps, scored at 128..4096"
)
def repeated_text_small() -> RunConfig:
    return _probe(
        TaskConfig(name="repeated_text", options={"eval_lengths": EVAL_LENGTHS}, train_len=TRAIN_LEN),
        steps=1000,
    )
