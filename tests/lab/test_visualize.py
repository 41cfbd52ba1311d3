"""DAPE bias and CoPE position plots: the plotted numbers against independent computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from poslab.lab.data.tokenizers import ByteTokenizer
from poslab.lab.presets import get_preset
from poslab.lab.train import train
from poslab.lab.visualize import (
    cope_map,
    dape_bias,
    encode_text,
    find_cope,
    layer_logits,
    plot_cope_positions,
    plot_dape_bias,
    sentence_ends,
    sentence_window,
    visualize_run,
)
from poslab.model import ModelConfig, build_model

TEXT = (
    "It is a truth universally acknowledged. A single man in possession of a good fortune must be "
    "in want of a wife. However little known the feelings of such a man may be."
)
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(encoding: str, **overrides):
    torch.manual_seed(0)
    options = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=4, encoding=encoding, max_len=512)
    model = build_model(ModelConfig(**{**options, **overrides})).eval()
    with torch.no_grad():  # off the zero/identity initialisations, so every term is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


@pytest.mark.parametrize(
    "encoding",
    ["dape[base=kerple_log]", "cope", "cope+rope", "alibi", "rope", "fox", "stickbreaking", "selective+pope"],
)
def test_recomputed_layer_matches_the_model(encoding):
    model = fresh(encoding)
    ids = encode_text(ByteTokenizer(), TEXT)
    for layer in (0, 1):
        ll = layer_logits(model, ids, layer=layer)
        torch.testing.assert_close(ll.output, ll.model_output, atol=1e-5, rtol=1e-4)


def test_dape_bias_equals_logits_minus_raw_logits(tmp_path):
    model = fresh("dape[base=kerple_log]")
    ids = encode_text(ByteTokenizer(), TEXT)
    t, query = ids.numel(), 100
    # Independently: layer 0's input, q and k, A, Kerple's B and the mixer f by hand.
    block, enc = model.blocks[0], model.encoding(0)
    with torch.no_grad():
        x = block.norm1(model.embed(ids[None]))
        q, k, _ = block.attn.qkv(x).view(1, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2))[0] / math.sqrt(8)  # (H, T, T)
        n = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).float()
        r1, r2 = (p.clamp(min=1e-2).view(-1) for p in (enc.base.r1, enc.base.r2))  # a decoder's (H, 1, 1)
        b = -r1.view(-1, 1, 1) * torch.log1p(r2.view(-1, 1, 1) * n)
        lin1, act, lin2 = enc.mlp
        features = torch.cat((a, b), dim=0).permute(1, 2, 0)  # (T, T, 2H)
        f = lin2(act(lin1(features))).permute(2, 0, 1)  # (H, T, T)
        logits = a + b + f
    expected = (logits - a)[:, query, : query + 1]
    got = dape_bias(model, ids, layer=0, query=query)
    assert got.position_term.shape == (4, query + 1) and got.query == query
    torch.testing.assert_close(got.position_term, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.base, b[:, query, : query + 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.mixer, f[:, query, : query + 1], atol=1e-5, rtol=1e-4)
    assert dape_bias(model, ids, layer=1, query=-1).query == t - 1
    pytest.importorskip("matplotlib")
    assert is_png(plot_dape_bias(got, tmp_path / "dape.png"))


def test_cope_positions_count_the_gates(tmp_path):
    model = fresh("cope", encoding_options={"npos_max": 16})
    tok = ByteTokenizer()
    ids = encode_text(tok, TEXT)
    cmap = cope_map(model, ids, layer=1)
    t = ids.numel()
    assert cmap.positions.shape == cmap.gates.shape == cmap.attention.shape == (4, t, t)
    i = t - 1
    for j in (0, 37, i):  # p_ij = sum of g_it over t = j..i, clamped at npos_max - 1
        expected = cmap.gates[:, i, j : i + 1].sum(-1).clamp(max=15)
        torch.testing.assert_close(cmap.positions[:, i, j], expected, atol=1e-5, rtol=1e-5)
    assert (cmap.gates.triu(1) == 0).all() and (cmap.positions.triu(1) == 0).all()
    torch.testing.assert_close(cmap.attention.sum(-1), torch.ones(4, t))
    ends = sentence_ends(tok, ids)
    assert [TEXT[e] for e in ends] == ["."] * 3 and ends[-1] == t - 1
    pytest.importorskip("matplotlib")
    labels = [tok.decode([int(i)]) for i in ids]
    assert is_png(plot_cope_positions(cmap, tmp_path / "cope.png", token_labels=labels, boundaries=ends))


def test_wrong_encoding_or_arguments():
    ids = encode_text(ByteTokenizer(), TEXT)
    with pytest.raises(ValueError, match="adds no position term"):
        dape_bias(fresh("rope"), ids)
    with pytest.raises(ValueError, match="no CoPE"):
        find_cope(fresh("dape").encoding(0))
    with pytest.raises(ValueError, match="layer must be"):
        layer_logits(fresh("dape"), ids, layer=5)
    with pytest.raises(ValueError, match="query must be"):
        dape_bias(fresh("dape"), ids, query=10**4)
    with pytest.raises(ValueError, match="empty"):
        encode_text(ByteTokenizer(), "")


def test_sentence_window_picks_the_prose():
    tok = ByteTokenizer()
    code = "x = f(a.b, c.d)\n" * 20
    prose = "One. Two. Three. Four. "
    stream = torch.tensor(tok.encode(code + prose + code))
    window = sentence_window(tok, stream, len(prose))
    assert tok.decode(window.tolist()).count(". ") >= 3


def test_visualize_run_directories(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(30):
        (corpus / f"d{d:02d}.txt").write_text(f"Document {d}. " + TEXT * 3 + "\n")
    paths = []
    for encoding in ("dape[base=kerple_log]", "cope"):
        config = get_preset("lm_stdlib_small").override(
            {
                "model.d_model": 32,
                "model.n_heads": 2,
                "model.encoding": encoding,
                "task.train_len": 16,
                "task.options": {"corpus": "files", "corpus_options": {"path": str(corpus)},
                                 "fractions": [0.6, 0.2, 0.2]},
                "train.steps": 2,
                "train.batch_size": 2,
                "train.warmup": 1,
                "train.device": "cpu",
                "eval.batches": 1,
                "eval.batch_size": 2,
            }
        )  # fmt: skip
        run_dir = tmp_path / encoding
        train(config, run_dir, progress=False)
        pytest.importorskip("matplotlib")
        paths += visualize_run(run_dir, tmp_path / "plots" / encoding)
    names = sorted(p.name for p in paths)
    assert names == [
        "cope_positions_layer0.png",
        "cope_positions_layer1.png",
        "dape_bias_layer0.png",
        "dape_bias_layer1.png",
    ]
    assert all(is_png(p) for p in paths)
    with pytest.raises(ValueError, match="no CoPE"):
        visualize_run(tmp_path / "dape[base=kerple_log]", tmp_path / "x", kind="cope")
    train(config.override({"model.encoding": "rope"}), tmp_path / "rope", progress=False)
    with pytest.raises(ValueError, match="neither DAPE nor CoPE"):
        visualize_run(tmp_path / "rope", tmp_path / "x")
