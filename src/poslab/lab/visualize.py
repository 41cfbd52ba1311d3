"""Pictures of what context-adaptive encodings learned, as in their papers.

- DAPE (arXiv 2405.14722, eq. 4 and its bias visualisations): for one query i of a real text window,
  each head's position term of the final logits, (A + B + f(A, B)) - A = B + f, against the key
  position j, next to the base bias B alone.
- CoPE (arXiv 2405.18719, section 3 and its attention maps): the contextual positions p_ij and the
  attention of each head over a text with its sentence ends ('.') marked, where counting heads reset.

Both read one attention layer by recomputing it from the input the layer received in a real forward
(`layer_logits`), so they work on trained run directories and on freshly built models alike:

    run = load_run("runs/x/dape_base=kerple_log/seed0")   # poslab.lab.experiments.extrapolation
    ids = encode_text(run.task.data.tokenizer, "def f(x):\\n    return x\\n")
    bias = dape_bias(run.model, ids, layer=0, query=-1)            # bias.position_term (H, i + 1)
    plot_dape_bias(bias, "dape_layer0.png")

    poslab visualize RUN_DIR --out DIR [--layers 0,1] [--length 512] [--text "..."]

matplotlib is imported only to draw (``pip install 'poslab[plot]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poslab.attention import attention_weights, eager_logits, full_extra_keys
from poslab.encodings.base import PositionEncoding
from poslab.encodings.compose import Composite
from poslab.encodings.cope import CoPE
from poslab.encodings.dape import DAPE
from poslab.lab import plotting
from poslab.lab.experiments.extrapolation import load_run
from poslab.model import Transformer


@dataclass(frozen=True)
class LayerLogits:
    """One causal attention layer of a model on one sequence of T tokens (batch of one).

    q, k, v: (H, T, Dh) after the encoding's rotation (if any). scores: A = q.k / sqrt(Dh) (H, T, T).
    bias: the encoding's position-only bias B (H, T, T), or None. logits: the final pre-mask logits
    (H, T, T). attention: softmax of the causally masked logits (H, T, T). output: attention @ v
    (T, H * Dh). model_output: what the model's attention produced in the same forward (T, H * Dh),
    equal to ``output`` up to rounding when the recomputation matches the model. extra_keys: what the
    encoding's ``input_keys`` hook made of the layer input (H, T, Dk), e.g. CoPE's sep_key gate keys,
    or None.
    """

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    bias: Tensor | None
    logits: Tensor
    attention: Tensor
    output: Tensor
    model_output: Tensor
    encoding: PositionEncoding
    extra_keys: Tensor | None = None


def _as_ids(idx: Tensor | Sequence[int]) -> Tensor:
    ids = torch.as_tensor(idx, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 1:
        raise ValueError(f"expected one sequence of token ids, (T,) or (1, T), got shape {tuple(ids.shape)}")
    return ids


def _check_layer(model: Transformer, layer: int) -> int:
    n = model.config.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer must be an integer in [0, {n}), got {layer!r}")
    return layer % n


@torch.no_grad()
def layer_logits(model: Transformer, idx: Tensor | Sequence[int], *, layer: int = 0) -> LayerLogits:
    """Run ``model`` on ``idx`` (T,) and recompute attention layer ``layer`` term by term.

    The layer's input is captured with a forward pre-hook, projected to q, k, v as the model does,
    then passed through the encoding's hooks exactly as `poslab.attend`'s eager path does (rotate,
    bias, logits, causal mask, softmax).
    """
    if not model.config.causal:
        raise ValueError("visualize reads causal (decoder) models")
    layer = _check_layer(model, layer)
    ids = _as_ids(idx).to(next(model.parameters()).device)
    attn = model.blocks[layer].attn
    captured: dict[str, Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0])),
        attn.out.register_forward_pre_hook(lambda _m, args: captured.__setitem__("y", args[0])),
    ]
    was_training = model.training
    model.eval()
    try:
        model(ids[None])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    x = captured["x"]  # (1, T, D), the normed input of the attention
    t = x.shape[1]
    q, k, v = attn.qkv(x).view(1, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (1, H, T, Dh)
    encoding = model.encoding(layer)
    pos = torch.arange(t, device=x.device)
    if "rotate" in encoding.hooks:
        q, k = encoding.rotate(q, k, pos, pos)
    bias = encoding.bias(pos, pos, causal=True) if "bias" in encoding.hooks else None
    extra_keys = full_extra_keys(encoding, q, x)
    scores, logits = eager_logits(
        q, k, v, encoding, bias, pos, pos, causal=True, extra_keys=extra_keys
    )  # (1, H, T, T) each
    attention = attention_weights(encoding, logits, pos, pos, causal=True)
    output = (attention @ v).transpose(1, 2).reshape(t, -1)  # (T, H * Dh)
    return LayerLogits(
        layer=layer,
        q=q[0],
        k=k[0],
        v=v[0],
        scores=scores[0],
        bias=None if bias is None else bias.expand_as(scores)[0],
        logits=logits[0],
        attention=attention[0],
        output=output,
        model_output=captured["y"][0],
        encoding=encoding,
        extra_keys=None if extra_keys is None else extra_keys[0],
    )


# -- DAPE ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DapeBias:
    """The position term of one query's logits, per head, as plotted by `plot_dape_bias`.

    position_term: (H, i + 1) final logits minus the raw logits A, i.e. B + f(A, B) for DAPE.
    base: (H, i + 1) the base bias B (zeros for a base without one).
    query: i. layer: the layer. label: the encoding (for titles).
    """

    position_term: Tensor
    base: Tensor
    query: int
    layer: int
    label: str

    @property
    def mixer(self) -> Tensor:
        """f(A, B) alone: the part DAPE learned on top of its base, (H, i + 1)."""
        return self.position_term - self.base


def query_index(query: int, t: int) -> int:
    """The position ``query`` names in a window of ``t`` tokens (negative counts from the end);
    ValueError outside the window, rather than wrapping around."""
    if isinstance(query, bool) or not isinstance(query, int) or not -t <= query < t:
        raise ValueError(
            f"query must be a position in [0, {t}) of the {t}-token window (negative counts from "
            f"the end), got {query!r}"
        )
    return query % t


def dape_bias(
    model: Transformer, idx: Tensor | Sequence[int], *, layer: int = 0, query: int = -1
) -> DapeBias:
    """DAPE's learned bias for query ``query`` of the sequence ``idx`` at layer ``layer``.

    Any encoding with an additive position term works (for ALiBi or Kerple it is B itself); an
    encoding whose position lives only in A (RoPE, NoPE) has none and raises ValueError.
    """
    ll = layer_logits(model, idx, layer=layer)
    encoding = ll.encoding
    if not (encoding.uses_logits or "bias" in encoding.hooks):
        raise ValueError(
            f"layer {ll.layer}'s encoding {encoding.name!r} adds no position term to the logits; "
            "the bias plot needs DAPE (or a bias encoding)"
        )
    i = query_index(query, ll.scores.shape[-1])
    term = (ll.logits - ll.scores)[:, i, : i + 1]
    base = ll.bias[:, i, : i + 1] if ll.bias is not None else torch.zeros_like(term)
    label = getattr(model.config, "encoding", encoding.name)
    return DapeBias(term.float().cpu(), base.float().cpu(), i, ll.layer, label)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_dape_bias(bias: DapeBias, path: str | Path, *, title: str | None = None) -> Path:
    """One panel per head: B + f (the learned position term) and B alone against key position j."""
    n_heads = bias.position_term.shape[0]
    rows, cols = _grid(n_heads)
    fig = plotting.figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    j = torch.arange(bias.query + 1).numpy()
    term, base = bias.position_term.numpy(), bias.base.numpy()
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= n_heads:
            ax.axis("off")
            continue
        ax.plot(j, term[h], linewidth=1, label="B + f(A, B)")
        ax.plot(j, base[h], linewidth=1, linestyle="--", label="B")
        ax.set_title(f"head {h}", fontsize=9)
        ax.grid(True, alpha=0.3)
        if h % cols == 0:
            ax.set_ylabel("logit term")
        if h // cols == rows - 1:
            ax.set_xlabel("key position j")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        title or f"{bias.label}: position term of query {bias.query}, layer {bias.layer}", fontsize=10
    )
    return plotting.save(fig, path, dpi=110)


# -- CoPE ------------------------------------------------------------------------------------------


def find_cope(encoding: PositionEncoding) -> CoPE:
    """The CoPE module of an encoding (itself, or the first logits part of a composition)."""
    if isinstance(encoding, CoPE):
        return encoding
    if isinstance(encoding, Composite):
        rewriters = [p for p in encoding.parts if p.uses_logits]
        if rewriters and isinstance(rewriters[0], CoPE):
            return rewriters[0]
    raise ValueError(
        f"encoding {encoding.name!r} has no CoPE reading the raw logits; the CoPE plot needs 'cope' "
        "or a composition whose first logits encoding is CoPE ('cope+rope')"
    )


@dataclass(frozen=True)
class CopeMap:
    """CoPE's gates, contextual positions and attention for one layer, all heads: (H, T, T) each,
    zero above the diagonal (future keys)."""

    gates: Tensor
    positions: Tensor
    attention: Tensor
    layer: int
    npos_max: int
    label: str


def cope_map(model: Transformer, idx: Tensor | Sequence[int], *, layer: int = 0) -> CopeMap:
    """Gates g_ij, positions p_ij (clamped at npos_max - 1) and attention of CoPE at ``layer``."""
    ll = layer_logits(model, idx, layer=layer)
    cope = find_cope(ll.encoding)
    t = ll.scores.shape[-1]
    pos = torch.arange(t, device=ll.scores.device)
    gate_keys = () if ll.extra_keys is None else (ll.extra_keys[None],)  # CoPE's sep_key
    gate_logits = cope.gate_logits(ll.scores[None], ll.q[None], ll.k[None], ll.v[None], *gate_keys)
    gates = cope.gates(gate_logits, pos, pos, causal=True)[0]
    positions = cope.positions(gate_logits, pos, pos, causal=True)[0]
    label = getattr(model.config, "encoding", cope.name)
    cpu = lambda x: x.float().cpu()  # noqa: E731
    return CopeMap(cpu(gates), cpu(positions), cpu(ll.attention), ll.layer, cope.npos_max, label)


def plot_cope_positions(
    cmap: CopeMap,
    path: str | Path,
    *,
    token_labels: Sequence[str] | None = None,
    boundaries: Sequence[int] = (),
    query: int = -1,
    title: str | None = None,
) -> Path:
    """Per head (rows): p_ij as a heatmap, the attention as a heatmap, and, for one query, p_ij and
    the gates g_ij against j. Sentence ends (``boundaries``, token indices) are marked by lines."""
    n_heads, t, _ = cmap.positions.shape
    i = query_index(query, t)
    future = ~torch.ones(t, t, dtype=torch.bool).tril()
    fig = plotting.figure(figsize=(20, 3.6 * n_heads))
    axes = fig.subplots(n_heads, 3, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 2]})
    for h in range(n_heads):
        p = cmap.positions[h].masked_fill(future, float("nan"))
        a = cmap.attention[h].masked_fill(future, float("nan"))
        for col, (values, name) in enumerate(((p, "contextual position p_ij"), (a, "attention"))):
            ax = axes[h][col]
            image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
            fig.colorbar(image, ax=ax, fraction=0.046)
            for b in boundaries:
                ax.axvline(b, color="red", linewidth=0.5, alpha=0.6)
                ax.axhline(b, color="red", linewidth=0.5, alpha=0.6)
            ax.set_title(f"head {h}: {name}", fontsize=9)
            ax.set_xlabel("key j")
            ax.set_ylabel("query i")
        ax = axes[h][2]
        j = torch.arange(i + 1).numpy()
        ax.plot(j, cmap.positions[h, i, : i + 1].numpy(), label=f"p_ij, i = {i}")
        gate_ax = ax.twinx()  # gates live in [0, 1], positions up to npos_max - 1
        gates = cmap.gates[h, i, : i + 1].numpy()
        gate_ax.fill_between(j, gates, step="mid", alpha=0.35, color="tab:orange", label="gate g_ij")
        gate_ax.set_ylim(0, 1.05)
        gate_ax.set_ylabel("gate g_ij", color="tab:orange")
        for b in boundaries:
            if b <= i:
                ax.axvline(b, color="red", linewidth=0.6, alpha=0.7)
        if token_labels is not None and i + 1 <= 160:
            ax.set_xticks(list(range(i + 1)))
            ax.set_xticklabels([_show(s) for s in token_labels[: i + 1]], fontsize=5, family="monospace")
        ax.set_title(f"head {h}: p_ij and gates of query {i} ('.' ends in red)", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("p_ij", color="tab:blue")
    fig.suptitle(title or f"{cmap.label}: CoPE layer {cmap.layer} (npos_max {cmap.npos_max})", fontsize=10)
    return plotting.save(fig, path, dpi=80)


def _show(token: str) -> str:
    return {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(token, token)


# -- text --------------------------------------------------------------------------------------------


def encode_text(tokenizer: Any, text: str, *, length: int | None = None) -> Tensor:
    """Token ids (T,) of ``text`` (cut to ``length`` tokens); ValueError for empty text."""
    ids = tokenizer.encode(text)
    if length is not None:
        ids = ids[:length]
    if not ids:
        raise ValueError("the text to visualise is empty")
    return torch.tensor(ids, dtype=torch.long)


def sentence_ends(tokenizer: Any, ids: Tensor) -> list[int]:
    """Indices of tokens that end a sentence: containing '.' and followed by whitespace (or last)."""
    texts = [tokenizer.decode([int(i)]) for i in ids]
    ends = []
    for n, piece in enumerate(texts):
        after = texts[n + 1] if n + 1 < len(texts) else " "
        if piece.rstrip().endswith(".") and (piece != piece.rstrip() or after[:1].isspace()):
            ends.append(n)
    return ends


def sentence_window(tokenizer: Any, stream: Tensor, length: int) -> Tensor:
    """The window of ``length`` tokens of ``stream`` holding the most sentence ends (the first such
    one): prose such as docstrings and comments in a code corpus, so counting heads have something
    to count."""
    if stream.numel() <= length:
        return stream[:length].long()
    vocab = max(int(stream.max()) + 1, 1)
    pieces = [tokenizer.decode([v]) if v < tokenizer.vocab_size else "" for v in range(vocab)]
    period = torch.tensor([p.rstrip().endswith(".") for p in pieces])
    space = torch.tensor([p[:1].isspace() for p in pieces])
    s = stream.long()
    ends = (period[s[:-1]] & space[s[1:]]).float()  # token n ends a sentence
    counts = ends.cumsum(0)
    window = counts[length - 1 :] - torch.cat((torch.zeros(1), counts[:-length]))
    start = int(window.argmax())
    return s[start : start + length]


# -- run directories ------------------------------------------------------------------------


def visualize_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: str = "auto",
    layers: Sequence[int] | None = None,
    length: int | None = None,
    query: int = -1,
    text: str | None = None,
    split: str = "validation",
) -> list[Path]:
    """Draw the DAPE bias or CoPE position plots of a trained LM run, one PNG per layer.

    kind: 'dape', 'cope' or 'auto' (from the run's encoding). layers: default all. length: tokens
    of the window (default 4L for DAPE, to show the learned bias past the training length; L for
    CoPE, readable character by character). text: the text to read (default: the window of the
    held-out ``split`` with the most sentence ends).
    """
    run = load_run(run_dir)
    model, tokenizer = run.model, run.task.data.tokenizer
    if kind == "auto":
        encoding = model.encoding(0)
        kind = "dape" if isinstance(encoding, DAPE) else "cope"
        if kind == "cope":
            try:
                find_cope(encoding)
            except ValueError:
                raise ValueError(
                    f"{run_dir}: encoding {run.label!r} is neither DAPE nor CoPE; visualize plots "
                    "DAPE's learned bias (--kind dape also reads bias encodings) or CoPE's positions"
                ) from None
    if kind not in ("dape", "cope"):
        raise ValueError(f"kind must be 'auto', 'dape' or 'cope', got {kind!r}")
    if length is None:
        length = run.train_len * (4 if kind == "dape" else 1)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    if text is not None:
        ids = encode_text(tokenizer, text, length=length)
    else:
        ids = sentence_window(tokenizer, run.task.data.stream(split), length)
    query_index(query, len(ids))  # before any plot is drawn
    layers = (
        list(range(model.config.n_layers)) if layers is None else [_check_layer(model, n) for n in layers]
    )
    out_dir = Path(out_dir)
    name = f"{run.label} seed {run.seed}"
    paths = []
    for layer in layers:
        if kind == "dape":
            bias = dape_bias(model, ids, layer=layer, query=query)
            title = f"{name}: B + f for query {bias.query} (trained at {run.train_len}), layer {layer}"
            paths.append(plot_dape_bias(bias, out_dir / f"dape_bias_layer{layer}.png", title=title))
        else:
            cmap = cope_map(model, ids, layer=layer)
            labels = [tokenizer.decode([int(i)]) for i in ids]
            title = f"{name}: CoPE layer {layer} (npos_max {cmap.npos_max}); red: sentence ends"
            paths.append(
                plot_cope_positions(
                    cmap,
                    out_dir / f"cope_positions_layer{layer}.png",
                    token_labels=labels,
                    boundaries=sentence_ends(tokenizer, ids),
                    query=query,
                    title=title,
                )
            )
    return paths
