"""`poslab head-stats`: per-head entropy, mean distance and far mass, against a float64 recomputation
of each layer's full attention matrix (`poslab.lab.visualize.layer_logits`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_extrapolation import tiny_lm, write_corpus

import poslab
from poslab.lab.cli import main
from poslab.lab.experiments.head_stats import head_statistics, kerple_parameters, run_statistics, windows_of
from poslab.lab.presets import get_preset
from poslab.lab.rundir import RunDir
from poslab.lab.train import train
from poslab.lab.visualize import layer_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(model, ids, *, train_len, last):
    """The statistics from the full (H, T, T) attention of each layer, in float64, query by query."""
    out = []
    t = ids.shape[0]
    for layer in range(model.config.n_layers):
        p = layer_logits(model, ids, layer=layer).attention.double()  # (H, T, T)
        entropy, distance, far = (torch.zeros(p.shape[0], dtype=torch.float64) for _ in range(3))
        for i in range(t - last, t):
            for j in range(i + 1):
                w = p[:, i, j]
                entropy -= torch.where(w > 0, w * torch.log(w), torch.zeros_like(w))
                distance += w * (i - j)
                far += w * (i - j > train_len)
        out.append([x / last for x in (entropy, distance, far)])
    return out


@pytest.mark.parametrize(
    "encoding",
    ["kerple_log", "dape[base=kerple_log]", "cope+rope", "alibi", "nope"]
    + ["cope", "selective", "stickbreaking", "fox", "cable", "pope", "fire", "relative"],
)
def test_statistics_equal_the_full_attention_matrix(encoding):
    torch.manual_seed(0)
    cfg = poslab.ModelConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=4, encoding=encoding)
    model = poslab.build_model(cfg)
    ids = torch.randint(0, 11, (1, 24))
    got = head_statistics(model, ids, train_len=5, last=10, block=3)
    want = reference(model, ids[0], train_len=5, last=10)
    for stats, (entropy, distance, far) in zip(got, want, strict=True):
        assert stats.length == 24
        torch.testing.assert_close(stats.entropy.double(), entropy, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.mean_distance.double(), distance, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.far_mass.double(), far, rtol=1e-4, atol=1e-5)
        assert (stats.entropy <= math.log(24) + 1e-5).all() and (stats.far_mass <= 1).all()
    # The block size changes nothing; windows are averaged.
    again = head_statistics(model, ids.repeat(2, 1), train_len=5, last=10, block=64)
    for a, b in zip(got, again, strict=True):
        torch.testing.assert_close(a.mean_distance, b.mean_distance, rtol=1e-5, atol=1e-5)


def test_nothing_is_far_within_the_training_length():
    model = poslab.build_model(poslab.ModelConfig(vocab_size=11, d_model=32, n_layers=1, n_heads=2))
    (stats,) = head_statistics(model, torch.randint(0, 11, (2, 16)), train_len=16)
    assert torch.equal(stats.far_mass, torch.zeros(2))


def test_kerple_parameters_are_read_under_dape_too():
    for spec in ["kerple_log", "dape[base=kerple_log]"]:
        model = poslab.build_model(poslab.ModelConfig(vocab_size=11, d_model=32, n_layers=2, encoding=spec))
        found = kerple_parameters(model)
        assert len(found) == 2 and all(len(layer["r1"]) == 4 and len(layer["r2"]) == 4 for layer in found)
        kerple = [m for m in model.modules() if type(m).__name__ == "KerpleLog"][0]
        assert found[0]["r1"] == pytest.approx(kerple.r1.detach().reshape(-1, 4)[0].clamp(min=1e-2).tolist())
    assert kerple_parameters(poslab.build_model(poslab.ModelConfig(vocab_size=11, d_model=32))) == [None] * 2


def test_the_command_writes_its_table_and_refuses_bad_input(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    train(tiny_lm(corpus, "kerple_log"), tmp_path / "runs" / "kerple", progress=False)
    assert (
        main(["head-stats", str(tmp_path / "runs"), "--lengths", "16,32", "--out", str(tmp_path / "o")]) == 0
    )
    records = json.loads((tmp_path / "o" / "head_stats.json").read_text())
    assert [sorted(r["lengths"]) for r in records] == [["16", "32"]]
    assert (
        records[0]["kerple"][0]["r1"]
        and "| kerple_log s0 | 0 | 0 |" in (tmp_path / "o" / "head_stats.md").read_text()
    )
    assert main(["head-stats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_a_probe_run_is_read_on_its_id_sequences_and_an_encoder_run_is_refused(tmp_path, capsys):
    config = get_preset("passkey_small").override(
        ["train.steps=2", "train.checkpoint_every=0", "eval.batches=1", "eval.batch_size=2"]
        + ["model.d_model=16", "model.encoding=alibi", "task.train_len=96", "task.options.eval_lengths=96"]
    )
    train(config, tmp_path / "runs" / "passkey", progress=False)
    run = RunDir(tmp_path / "runs" / "passkey").load_model()
    # The task's own sampler at any length, its id split, generator seed 0: the same text for every run.
    ids = windows_of(run, 160, 3)
    want = run.task.sample(3, 160, generator=torch.Generator().manual_seed(0), **run.task.splits()["id"])
    assert torch.equal(ids, want.inputs)
    # The pass key's last 5 queries write its digits; the statistics are those of head_statistics.
    record = run_statistics(tmp_path / "runs" / "passkey", [160], windows=3, last=5)
    direct = head_statistics(run.model, ids, train_len=96, last=5)
    assert record["train_len"] == 96 and record["kerple"] == [None, None]
    for layer, stats in zip(record["lengths"]["160"], direct, strict=True):
        assert layer["far_mass"] == pytest.approx(stats.far_mass.tolist())
        assert layer["entropy"] == pytest.approx(stats.entropy.tolist())
    encoder = get_preset("chomsky_cpu").override(
        [
            "train.steps=1",
            "train.checkpoint_every=0",
            "eval.batches=1",
            "eval.batch_size=2",
            "model.d_model=16",
        ]
    )
    assert not encoder.task.build().causal
    train(encoder, tmp_path / "enc", progress=False)
    assert main(["head-stats", str(tmp_path / "enc"), "--lengths", "16", "--out", str(tmp_path / "o")]) == 2
    assert "head statistics read causal models" in capsys.readouterr().err


def test_cope_positions_clamped_mass_and_gate_density_equal_a_query_by_query_count():
    torch.manual_seed(1)
    cfg = poslab.ModelConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=4, encoding="cope[npos_max=6]")
    model = poslab.build_model(cfg)
    ids = torch.randint(0, 11, (1, 20))
    got = head_statistics(model, ids, train_len=5, last=8, block=3)
    t, last = 20, 8
    for layer, stats in enumerate(got):
        full = layer_logits(model, ids[0], layer=layer)
        gates, a = torch.sigmoid(full.scores.double()), full.attention.double()  # (H, T, T)
        position, clamped, density = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
        for i in range(t - last, t):
            density += sum(gates[:, i, s] for s in range(i + 1)) / (i + 1)
            for j in range(i + 1):
                p = sum(gates[:, i, s] for s in range(j, i + 1))  # eq. 3: the gates from j to i
                position += a[:, i, j] * p.clamp(max=5)
                clamped += a[:, i, j] * (p >= 5)
        for value, want in zip(
            (stats.cope_position, stats.cope_clamped, stats.gate_density),
            (position, clamped, density),
            strict=True,
        ):
            torch.testing.assert_close(value.double(), want / last, rtol=1e-4, atol=1e-5)
        assert (stats.gate_density > 0).all() and (stats.gate_density < 1).all()
    # Other encodings have none; the table gets CoPE's columns only when a run has them.
    (plain,) = head_statistics(
        poslab.build_model(poslab.ModelConfig(vocab_size=11, d_model=32, n_layers=1)), ids, train_len=5
    )
    assert plain.cope_position is None and plain.gate_density is None
