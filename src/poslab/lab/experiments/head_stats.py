"""Where trained heads look: each head's attention entropy, mean distance and far mass at any length.

The DAPE paper's headline (Kerple collapses far past the training length, DAPE repairs it) needs heads
that attend far; a head that only looks at the last few tokens cannot break or be repaired. This
module measures, per layer and head, on held-out windows of length T:

- entropy: -sum_j p_ij log p_ij in nats, averaged over the scored queries (log of the number of keys a
  head spreads over; 0 for a head on one key);
- mean distance: sum_j p_ij (i - j), the average number of tokens a head looks back;
- far mass: the attention on keys more than ``train_len`` tokens back, which no training window had;

and for a CoPE layer (Golovneva et al.), from its gates g_ij = sigmoid(q_i . k_j / sqrt(Dh)) and
contextual positions p_ij = sum_{t=j..i} g_it:

- position: sum_j a_ij min(p_ij, npos_max - 1), the contextual position the head reads on average;
- clamped mass: the attention on keys whose p_ij reaches npos_max - 1, the table's last entry, where
  every further key looks the same;
- gate density: sum_{t<=i} g_it / (i + 1), the share of the tokens before a query its gates count
  (1: CoPE counts tokens like a relative encoding; small: it counts rare ones, e.g. sentences);

over the last ``last`` queries of each window (the ones the headline perplexity scores; on the pass
key, ``last`` 5 is the queries that write its digits), together with
each Kerple head's parameters (r1, r2 of bias = -r1 log(1 + r2 (i - j)), also under DAPE). The
attention is recomputed from each layer's input exactly as `poslab.attend`'s eager path does, one
block of queries at a time, so a window of 8192 tokens needs O(block x T) memory per layer:

    poslab head-stats RUN_DIR [RUN_DIR ...] --lengths 128,8192 --windows 4 --out DIR

A language-model run is read on its held-out validation windows; a run of a causal task (a probe such
as ``passkey`` or ``repeated_text``) on sequences its sampler draws as its ``id`` split does, with
generator seed 0, at each length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poslab.attention import attention_weights, eager_logits, full_extra_keys
from poslab.encodings.cope import CoPE, cope_positions
from poslab.encodings.kerple import KerpleLog
from poslab.lab.checkpoint import check_writable, write_text
from poslab.lab.experiments.command import Command, arg
from poslab.lab.parsing import parse_lengths
from poslab.lab.rundir import LoadedModel, RunDir, find_trained_runs
from poslab.model import Transformer


@dataclass(frozen=True)
class HeadStats:
    """One layer's statistics at one length, each (H,), averaged over windows and scored queries."""

    layer: int
    length: int
    entropy: Tensor
    mean_distance: Tensor
    far_mass: Tensor
    # a CoPE layer's (None for other encodings): see the module's docstring
    cope_position: Tensor | None = None
    cope_clamped: Tensor | None = None
    gate_density: Tensor | None = None


def layer_inputs(model: Transformer, ids: Tensor) -> list[Tensor]:
    """The input of every attention layer in one forward of ``ids`` (B, T): a list of (B, T, D)."""
    captured: list[Tensor] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        for block in model.blocks
    ]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def head_statistics(
    model: Transformer, windows: Tensor, *, train_len: int, last: int = 256, block: int = 128
) -> list[HeadStats]:
    """Per-layer `HeadStats` of a causal ``model`` over ``windows`` (W, T) of token ids.

    Scores the last ``min(last, T)`` queries of each window; far mass counts keys with i - j >
    ``train_len``. Every layer's attention is recomputed blockwise from its captured input.
    """
    if not model.config.causal:
        raise ValueError("head statistics read causal (decoder) models")
    if windows.dim() != 2 or windows.shape[1] < 1:
        raise ValueError(f"expected windows of shape (W, T), got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    try:
        inputs = layer_inputs(model, windows)
    finally:
        model.train(was_training)
    n_windows, t = windows.shape
    first = t - min(last, t)
    stats = []
    for layer, x in enumerate(inputs):
        attn, encoding = model.blocks[layer].attn, model.encoding(layer)
        q, k, v = attn.qkv(x).view(n_windows, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=x.device)
        if "rotate" in encoding.hooks:
            q, k = encoding.rotate(q, k, pos, pos)  # (W, H, T, Dh) each
        extra_keys = full_extra_keys(encoding, q, x)
        starts = list(range(first, t, block))
        spans = [(start, min(start + block, t) - 1) for start in starts]
        # What a block's logits need from earlier queries (selective's running penalty), as `attend`.
        contexts = encoding.block_context(q, k, extra_keys, spans, pos, causal=True) or [None] * len(spans)
        # A CoPE layer as published (not composed, its gates from the scores): its positions too.
        cope = encoding if type(encoding) is CoPE and not (encoding.sep_key or encoding.val_gates) else None
        sums = torch.zeros(6 if cope else 3, attn.n_heads, dtype=torch.float64)
        for start, context in zip(starts, contexts, strict=True):
            end = min(start + block, t)
            q_pos, k_pos = pos[start:end], pos[:end]
            bias = encoding.bias(q_pos, k_pos, causal=True) if "bias" in encoding.hooks else None
            scores, logits = eager_logits(
                q[:, :, start:end],
                k[:, :, :end],
                v[:, :, :end],
                encoding,
                bias,
                q_pos,
                k_pos,
                causal=True,
                extra_keys=None if extra_keys is None else extra_keys[:, :, :end],
                context=context,
            )
            p = attention_weights(encoding, logits, q_pos, k_pos, causal=True).double()  # (W, H, b, end)
            distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).double()  # (b, end)
            entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)  # (W, H, b)
            sums[0] += entropy.sum((0, 2))
            sums[1] += (p * distance).sum(-1).sum((0, 2))
            sums[2] += (p * (distance > train_len)).sum(-1).sum((0, 2))
            if cope is not None:
                gates = cope.gates(scores.double(), q_pos, k_pos, causal=True)
                positions = cope_positions(gates, q_pos, causal=True)  # p_ij, unclamped (W, H, b, end)
                top = cope.npos_max - 1
                sums[3] += (p * positions.clamp(max=top)).sum(-1).sum((0, 2))
                sums[4] += (p * (positions >= top)).sum(-1).sum((0, 2))
                sums[5] += (positions[..., 0] / (q_pos + 1)).sum((0, 2))
        sums /= n_windows * (t - first)
        stats.append(HeadStats(layer, t, *(s.float() for s in sums)))
    return stats


def kerple_parameters(model: Transformer) -> list[dict[str, list[float]] | None]:
    """Each layer's causal Kerple (log) parameters r1 and r2 per head (under DAPE too), or None."""
    found = []
    for layer in range(model.config.n_layers):
        kerple = next((m for m in model.encoding(layer).modules() if isinstance(m, KerpleLog)), None)
        if kerple is None:
            found.append(None)
            continue
        n_heads = kerple.n_heads
        # Row 0 is the causal one where the parameters are stored per direction.
        r1, r2 = (p.detach().reshape(-1, n_heads)[0].clamp(min=1e-2) for p in (kerple.r1, kerple.r2))
        found.append({"r1": r1.tolist(), "r2": r2.tolist()})
    return found


def run_statistics(
    run_dir: str | Path, lengths: list[int], *, windows: int = 4, last: int = 256, block: int = 128
) -> dict[str, Any]:
    """Head statistics of one trained causal run at each length (`windows_of`)."""
    run = RunDir(run_dir).load_model()
    if not run.task.causal:
        raise ValueError(
            f"{run_dir}: head statistics read causal models; task {run.config.task.name!r} is not"
        )
    train_len = run.config.task.train_len
    record: dict[str, Any] = {
        "run": str(run_dir),
        "encoding": run.config.model.encoding,
        "seed": run.config.train.seed,
        "train_len": train_len,
        "kerple": kerple_parameters(run.model),
        "lengths": {},
    }
    for length in lengths:
        ids = windows_of(run, length, windows)
        per_layer = head_statistics(run.model, ids, train_len=train_len, last=last, block=block)
        record["lengths"][str(length)] = [
            {
                "layer": s.layer,
                "entropy": s.entropy.tolist(),
                "mean_distance": s.mean_distance.tolist(),
                "far_mass": s.far_mass.tolist(),
                **(
                    {}
                    if s.cope_position is None
                    else {
                        "cope_position": s.cope_position.tolist(),
                        "cope_clamped": s.cope_clamped.tolist(),
                        "gate_density": s.gate_density.tolist(),
                    }
                ),
            }
            for s in per_layer
        ]
    return record


def windows_of(run: LoadedModel, length: int, count: int) -> Tensor:
    """(``count``, ``length``) token ids: a language model's held-out validation windows, or a
    task's ``id``-split sequences drawn with generator seed 0 (the same for every run)."""
    if run.config.task.name == "lm":
        return run.task.data.eval_windows(length, split="validation", max_windows=count)[:, :length]
    generator = torch.Generator().manual_seed(0)
    return run.task.sample(count, length, generator=generator, **run.task.splits()["id"]).inputs


def markdown(records: list[dict[str, Any]]) -> str:
    """One table row per run, layer and head: Kerple's r1 and r2, then each length's statistics (and
    CoPE's position, clamped mass and gate density where a run has CoPE layers)."""
    lengths = sorted({int(n) for r in records for n in r["lengths"]})
    cope = any("cope_position" in s for r in records for layers in r["lengths"].values() for s in layers)
    head = ["run", "layer", "head", "r1", "r2"]
    for n in lengths:
        head += [f"entropy@{n}", f"distance@{n}", f"far@{n}"]
        head += [f"position@{n}", f"clamped@{n}", f"gates@{n}"] if cope else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        label = f"{r['encoding']} s{r['seed']}"
        for layer, kerple in enumerate(r["kerple"]):
            n_heads = len(r["lengths"][str(lengths[0])][layer]["entropy"])
            for h in range(n_heads):
                cells = [label, str(layer), str(h)]
                cells += [f"{kerple['r1'][h]:.3f}", f"{kerple['r2'][h]:.3f}"] if kerple else ["-", "-"]
                for n in lengths:
                    s = r["lengths"][str(n)][layer]
                    cells += [
                        f"{s['entropy'][h]:.2f}",
                        f"{s['mean_distance'][h]:.1f}",
                        f"{s['far_mass'][h]:.3f}",
                    ]
                    if cope and "cope_position" in s:
                        cells += [
                            f"{s['cope_position'][h]:.1f}",
                            f"{s['cope_clamped'][h]:.3f}",
                            f"{s['gate_density'][h]:.3f}",
                        ]
                    elif cope:
                        cells += ["-", "-", "-"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _command(args: Any) -> str:
    lengths = parse_lengths(args.lengths)
    runs = find_trained_runs(args.runs)
    if not runs:
        raise ValueError(f"no trained runs under {', '.join(args.runs)}")
    if args.windows < 1 or args.last < 1:
        raise ValueError("--windows and --last take positive integers")
    out = Path(args.out)
    check_writable(out)  # before the work, not after it
    records = [run_statistics(run, lengths, windows=args.windows, last=args.last) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "head_stats.json", json.dumps(records, indent=1) + "\n")
    write_text(out / "head_stats.md", markdown(records))
    uniform = ", ".join(f"{math.log(n):.2f} at {n}" for n in lengths)
    return (
        f"head statistics of {len(runs)} run(s) in {out}: head_stats.json, head_stats.md "
        f"(a head spread evenly over all earlier keys has entropy about log T: {uniform})\n"
    )


COMMANDS = (
    Command(
        "head-stats",
        "each head's attention entropy, mean distance and far mass (and Kerple's r1, r2) at each length",
        (
            arg("runs", nargs="+", help="trained runs (LM or a causal task), or directories holding them"),
            arg("--lengths", default="128,8192", help="window lengths (default 128,8192)"),
            arg("--windows", type=int, default=4, help="windows (sequences) per length (default 4)"),
            arg("--last", type=int, default=256, help="score the last N queries of each window (256)"),
            arg("--out", required=True, help="where to write head_stats.json and head_stats.md"),
        ),
        _command,
    ),
)
