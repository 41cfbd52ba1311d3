"""`poslab reproduce`: a paper table's grids, resumed, and its page built from the per-run files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from poslab.cli import main
from poslab.evaluate import eval_seed
from poslab.experiments import paper_tables
from poslab.experiments.paper_tables import TABLES, PaperTable, Part, get_table
from poslab.experiments.reproduce import _value, part_config, plan_table, reproduce
from poslab.presets import list_presets
from poslab.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("train.steps=4", "train.checkpoint_every=2", "eval.batches=1")


@pytest.fixture
def tiny_table(monkeypatch):
    """A two-part table on the smoke preset: (NoPE, RoPE) x (8 and 6 pairs)."""
    table = PaperTable(
        name="tiny",
        title="Tiny flip-flop",
        source="a test",
        metric="error",
        rows=(("No PE", "nope"), ("RoPE", "rope")),
        parts=(
            Part(
                name="short", cpu="smoke", paper="flipflop_paper", overrides=FAST, splits=("id", "ood_dense")
            ),
            Part(name="shorter", cpu="smoke", paper="flipflop_paper", overrides=(*FAST, "task.train_len=6")),
        ),
        numbers={"RoPE": {"short/id": 1.8, "shorter/id": 0.5}},
        paper_setting="none",
        seeds=(0, 1),
    )
    monkeypatch.setitem(TABLES, "tiny", table)
    return table


def test_every_table_names_real_presets_encodings_and_columns():
    assert {"cope_flipflop", "cope_selective_copy", "cope_counting"} <= set(TABLES)
    for table in TABLES.values():
        assert any("dape" in spec for _, spec in table.rows)  # the row beyond the paper
        for part in table.parts:
            assert part.cpu in list_presets() and part.paper in list_presets()
            for scale in ("cpu", "paper"):
                config = part_config(part, scale)
                for _, spec in table.rows:
                    config.override({"model.encoding": spec}).model.to_model_config(
                        vocab_size=8, n_outputs=None, causal=True
                    ).build_encoding()
        assert set(table.numbers) <= {row for row, _ in table.rows}


def test_table_numbers_must_name_its_rows_and_columns():
    part = Part(name="p", cpu="smoke", paper="smoke")
    with pytest.raises(ValueError, match="rows it does not have"):
        PaperTable(
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"B": {"p/id": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown columns"):
        PaperTable(
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"A": {"p/ood": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown table 'nope'; tables: .*cope_flipflop"):
        get_table("nope")


def test_reproduce_trains_every_part_and_the_page_holds_each_runs_numbers(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = reproduce("tiny", out, jobs=1)
    assert (result["finished"], result["planned"], result["trained"]) == (8, 8, 8)
    page = (out / "README.md").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * (2 + 1)  # rows x seeds x (columns of short + shorter)
    for row in rows:  # every value is the run's own results.json value
        split = row["column"].split("/")[1]
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert float(row["value"]) == pytest.approx(results["metrics"]["splits"][split]["error"])
        assert results["machine"]["cpu"] in page
    # the RoPE cell of short/id: mean ± std of its two seeds beside the paper's 1.8
    values = [float(r["value"]) for r in rows if r["row"] == "RoPE" and r["column"] == "short/id"]
    mean = sum(values) / 2
    std = abs(values[0] - values[1]) / 2**0.5
    line = next(ln for ln in page.splitlines() if ln.startswith("| RoPE | ") and "1.8" in ln)
    assert line.split(" | ")[1:3] == [f"{mean:.2f} ± {std:.2f} (2)", "1.8"]
    assert "8 of 8 runs finished" in page and "Incomplete" not in page
    assert "poslab reproduce tiny --out" in page and "## Reading" in page and "Not written yet" in page


def test_reproduce_resumes_keeps_finished_runs_and_the_notes(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    reproduce("tiny", out, seeds=[0], jobs=1)
    finished = out / "short" / "rope" / "seed0" / "results.json"
    before = finished.read_bytes()
    (out / "notes.md").write_text("RoPE beats NoPE here, as in the paper.\n")
    result = reproduce("tiny", out, seeds=[0, 1], jobs=1)
    assert result["trained"] == 4 and result["finished"] == 8
    assert finished.read_bytes() == before
    assert "RoPE beats NoPE here, as in the paper." in (out / "README.md").read_text()


def test_page_only_reports_missing_runs_without_training(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = reproduce("tiny", out, train=False)
    assert result["trained"] == 0 and result["finished"] == 0
    page = (out / "README.md").read_text()
    assert "**Incomplete**: 8 runs not finished" in page
    assert not (out / "short" / "rope" / "seed0" / "results.json").exists()


def test_a_finished_run_of_another_config_stops_the_table_before_training(tiny_table, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    reproduce("tiny", out, seeds=[0], jobs=1)
    changed = Part(name="short", cpu="smoke", paper="flipflop_paper", overrides=(*FAST, "train.lr=0.01"))
    monkeypatch.setitem(
        TABLES, "tiny", PaperTable(**{**tiny_table.__dict__, "parts": (changed, tiny_table.parts[1])})
    )
    before = sorted(p.name for p in (out / "short").rglob("*"))
    with pytest.raises(ValueError, match="different config.*train.lr"):
        reproduce("tiny", out, seeds=[0], jobs=1)
    assert sorted(p.name for p in (out / "short").rglob("*")) == before


def test_cli_reproduce_errors_are_one_line_with_exit_2(tiny_table, tmp_path, capsys):
    assert main(["reproduce", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert "unknown table 'nosuch'" in capsys.readouterr().err
    assert main(["reproduce", "tiny", "--out", str(tmp_path / "x"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["reproduce", "tiny", "--out", str(blocker / "sub"), "--page-only"]) == 2
    assert capsys.readouterr().err.startswith("poslab: error:")
    assert blocker.read_text() == "not a directory"


def test_cli_reproduce_prints_the_comparison(tiny_table, tmp_path, capsys):
    code = main(
        ["reproduce", "tiny", "--out", str(tmp_path / "t"), "--seeds", "0", "--jobs", "1", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "## Ours beside the paper's" in out and "## Every seed" not in out
    assert "4 of 4 runs finished (4 trained now)" in out


def test_module_tables_are_registered_under_their_names():
    assert all(name == table.name for name, table in paper_tables.TABLES.items())


# -- length generalisation: columns at one evaluated length ----------------------------------------


def test_length_generalisation_table_scores_validation_at_1x_and_2_5x(tmp_path):
    table = get_table("cope_length_generalisation")
    assert [spec for _, spec in table.rows] == ["relative", "cope", "cope+relative", "dape[base=kerple_log]"]
    assert table.columns == ["python_docs/validation@128", "python_docs/validation@320"]
    one, two_and_a_half = table.columns
    assert table.numbers["Relative"] == {one: 22.90, two_and_a_half: 24.2}
    assert table.numbers["CoPE"] == {one: 22.55, two_and_a_half: 21.6}
    assert table.ratio == ("python_docs/validation@320", "python_docs/validation@128")
    for scale in ("cpu", "paper"):
        config = part_config(table.parts[0], scale)
        task = config.task.build()
        assert config.task.train_len == 128 and config.eval.splits == ("validation",)
        assert task.split_lengths("validation") == (128, 320) and task.split_lengths("id") is None
        assert task.corpus == "python_docs" and task.tokenizer == "bpe"
    grids = plan_table(table, tmp_path / "t", [0])  # the columns' lengths are the ones scored
    assert len(grids["python_docs"]) == 4 and not (tmp_path / "t").exists()


def test_a_column_at_a_length_reads_that_lengths_value():
    results = {
        "metrics": {
            "splits": {"validation": {"ppl": 20.5}},
            "lengths": {"validation": {"128": {"ppl": 19.75}, "320": {"ppl": 21.25, "loss": 3.0}}},
        }
    }
    assert _value(results, "validation@320", "ppl") == 21.25
    assert _value(results, "validation@128", "ppl") == 19.75
    assert _value(results, "validation", "ppl") == 20.5
    # A length (or split) the run did not score is a missing cell, as a missing split is.
    assert _value(results, "validation@256", "ppl") is None
    assert _value(results, "test@320", "ppl") is None
    assert _value({"metrics": {"splits": {}}}, "validation@320", "ppl") is None


LENGTHS = ("validation@16", "validation@40")
LENGTH_COLUMNS = ("files/validation@16", "files/validation@40")


def _lm_table(tmp_path: Path, splits: tuple[str, ...], eval_lengths: str | None = "16,40") -> PaperTable:
    """A one-part LM table on a tiny corpus of files: NoPE and RoPE, 4 steps at 16 tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away"]
    for d in range(30):
        picks = torch.randint(0, len(words), (120,), generator=g).tolist()
        (corpus / f"doc{d:02d}.txt").write_text(" ".join(words[i] for i in picks) + ".\n")
    overrides = (
        "task.options.corpus=files",
        f"task.options.corpus_options.path={corpus}",
        "task.options.fractions=0.6,0.2,0.2",
        *([f"task.options.eval_lengths={eval_lengths}"] if eval_lengths else []),
        "task.train_len=16",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_len=16",
        "train.batch_size=4",
        "train.warmup=1",
        "eval.splits=validation",
        "eval.batch_size=4",
        *FAST,
    )
    part = Part(name="files", cpu="lm_stdlib_small", paper="lm_paper_128", overrides=overrides, splits=splits)
    full = splits == LENGTHS
    return PaperTable(
        name="tiny_lm",
        title="Tiny length generalisation",
        source="a test",
        metric="ppl",
        rows=(("No PE", "nope"), ("RoPE", "rope")),
        parts=(part,),
        # The paper's numbers and the ratio only where the columns are the test's usual two.
        numbers={"RoPE": {"files/validation@16": 10.0, "files/validation@40": 12.5}} if full else {},
        ratio=("files/validation@40", "files/validation@16") if full else None,
        seeds=(0, 1),
    )


def test_a_length_the_runs_do_not_score_stops_the_table_before_training(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(TABLES, "tiny_lm", _lm_table(tmp_path, ("validation@16", "validation@32")))
    with pytest.raises(ValueError, match="validation@32: the runs score validation at 16, 40, not at 32"):
        reproduce("tiny_lm", out)
    monkeypatch.setitem(TABLES, "tiny_lm", _lm_table(tmp_path, ("validation@16",), eval_lengths=None))
    with pytest.raises(ValueError, match="not scored per length by 'lm'.*eval_lengths"):
        reproduce("tiny_lm", out)
    assert not out.exists()
    with pytest.raises(ValueError, match="length after '@' must be a positive integer"):
        _lm_table(tmp_path, ("validation@long",))
    with pytest.raises(ValueError, match="ratio must be two of its columns"):
        PaperTable(**{**_lm_table(tmp_path, LENGTHS).__dict__, "ratio": (LENGTH_COLUMNS[1], "files/test")})


def test_length_columns_end_to_end_are_full_context_perplexities(tmp_path, monkeypatch):
    table = _lm_table(tmp_path, LENGTHS)
    monkeypatch.setitem(TABLES, "tiny_lm", table)
    out = tmp_path / "out"
    result = reproduce("tiny_lm", out, jobs=1)
    assert (result["finished"], result["planned"]) == (4, 4)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * 2  # encodings x seeds x lengths
    # The 40-token column is the perplexity of the trained model on 40-token windows read whole
    # (every target, the full causal context), as `evaluate` draws them.
    rope = next(r for r in rows if r["encoding"] == "rope" and r["column"] == "files/validation@40")
    run = RunDir(rope["run_dir"]).load_model()
    generator = torch.Generator().manual_seed(eval_seed(0, "validation", 40))
    batch = run.task.sample(4, 40, generator=generator, **run.task.splits()["validation"])
    with torch.no_grad():
        logits = run.model(batch.inputs)
    assert batch.inputs.shape == (4, 40)
    expected = math.exp(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).item())
    assert float(rope["value"]) == pytest.approx(expected, rel=1e-5)
    # Both lengths beside the paper's, and the ratio of each seed's two values, mean ± std.
    page = (out / "README.md").read_text()
    assert "| files/validation@16 ours | files/validation@16 paper | files/validation@40 ours" in page
    value = {(r["row"], r["seed"], r["column"]): float(r["value"]) for r in rows}
    ratios = [value[("RoPE", s, LENGTH_COLUMNS[1])] / value[("RoPE", s, LENGTH_COLUMNS[0])] for s in "01"]
    mean, std = sum(ratios) / 2, abs(ratios[0] - ratios[1]) / 2**0.5
    line = next(ln for ln in page.splitlines() if ln.startswith("| RoPE | "))
    assert line.split(" | ")[-2:] == [f"{mean:.3f} ± {std:.3f} (2)", "1.250 |"]
    nope = next(ln for ln in page.splitlines() if ln.startswith("| No PE | "))
    assert nope.endswith(" | – |")  # no paper numbers, no paper ratio
