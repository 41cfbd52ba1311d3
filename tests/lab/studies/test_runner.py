"""`poslab study` of a task table (also `poslab reproduce`): its grids, resumed, and its page built from the
per-run files."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from poslab.lab import plotting
from poslab.lab.cli import main
from poslab.lab.evaluate import eval_seed
from poslab.lab.experiments.grid import estimated_cost, makespan, start_order
from poslab.lab.presets import DEMO_ENCODINGS, get_preset, list_presets
from poslab.lab.report.datafile import DATA
from poslab.lab.report.stats import difference_cell, interval, paired_difference
from poslab.lab.rundir import RunDir
from poslab.lab.studies.declaration import STUDIES, TASK_TABLE, Part, Study, get_study
from poslab.lab.studies.page import length_curves, position_blind_floor
from poslab.lab.studies.runner import part_config, plan_study, run_study

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("train.steps=4", "train.checkpoint_every=2", "eval.batches=1")


@pytest.fixture
def tiny_table(monkeypatch):
    """A two-part table on the smoke preset: (NoPE, RoPE) x (8 and 6 pairs)."""
    table = Study(
        kind=TASK_TABLE,
        name="tiny",
        title="Tiny flip-flop",
        source="a test",
        metric="error",
        rows=(("No PE", "nope"), ("RoPE", "rope")),
        parts=(
            Part(
                name="short",
                preset="smoke",
                paper_preset="flipflop_paper",
                overrides=FAST,
                splits=("id", "ood_dense"),
            ),
            Part(
                name="shorter",
                preset="smoke",
                paper_preset="flipflop_paper",
                overrides=(*FAST, "task.train_len=6"),
            ),
        ),
        numbers={"RoPE": {"short/id": 1.8, "shorter/id": 0.5}},
        pairs=(("RoPE", "No PE"),),
        bars=True,
        paper_setting="none",
        seeds=(0, 1),
    )
    monkeypatch.setitem(STUDIES, "tiny", table)
    return table


def test_every_table_names_real_presets_encodings_and_columns():
    assert {"cope_flipflop", "cope_selective_copy", "cope_counting"} <= set(STUDIES)
    for table in (study for study in STUDIES.values() if study.kind == TASK_TABLE):
        assert any("dape" in spec for _, spec in table.rows)  # the row beyond the paper
        for part in table.parts:
            # a study without a paper (the length-generalisation benchmark) has no paper-scale preset
            assert part.preset in list_presets() and part.paper_preset in (*list_presets(), None)
            for scale in ("cpu", "paper") if part.paper_preset else ("cpu",):
                config = part_config(part, scale)
                for _, spec in table.rows:
                    config.override({"model.encoding": spec}).model.to_model_config(
                        vocab_size=8, n_outputs=None, causal=True
                    ).build_encoding()
        assert set(table.numbers) <= {row for row, _ in table.rows}


def test_reproduce_trains_every_part_and_the_page_holds_each_runs_numbers(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = run_study("tiny", out, jobs=1)
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
    # ... marked: this table says nothing of where its numbers were read
    assert line.split(" | ")[1:3] == [f"{mean:.2f} ± {std:.2f} (2)", "1.8*"]
    assert "The paper's numbers (marked *): not checked against the paper." in page
    # The pair the reading compares: RoPE minus No PE per column, paired by seed.
    for column in ("short/id", "short/ood_dense", "shorter/id"):
        rope, nope = (
            {int(r["seed"]): float(r["value"]) for r in rows if r["row"] == name and r["column"] == column}
            for name in ("RoPE", "No PE")
        )
        cell = difference_cell(paired_difference(rope, nope))
        assert cell.endswith("/2") and cell in next(
            ln for ln in page.splitlines() if ln.startswith("| RoPE minus No PE |")
        )
    # Provenance: the runs made here record their commit and instruction set.
    machine = json.loads((Path(rows[0]["run_dir"]) / "results.json").read_text())["machine"]
    provenance = page.split("## Provenance")[1].split("## ")[0]
    assert f"| 8 | all | {machine['commit']} | {machine['cpu']} | {machine['isa']} | 1 |" in provenance
    if plotting.can_plot("the test"):
        assert (out / "plots" / "columns.png").read_bytes()[:4] == b"\x89PNG"
        assert "![every column](plots/columns.png)" in page
    assert "8 of 8 runs finished" in page and "Incomplete" not in page
    assert "poslab study tiny --out" in page and "## Reading" in page and "Not written yet" in page


def test_reproduce_resumes_keeps_finished_runs_and_the_notes(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    run_study("tiny", out, seeds=[0], jobs=1)
    finished = out / "short" / "rope" / "seed0" / "results.json"
    before = finished.read_bytes()
    (out / "notes.md").write_text("RoPE beats NoPE here, as in the paper.\n")
    result = run_study("tiny", out, seeds=[0, 1], jobs=1)
    assert result["trained"] == 4 and result["finished"] == 8
    assert finished.read_bytes() == before
    assert "RoPE beats NoPE here, as in the paper." in (out / "README.md").read_text()


def test_page_only_reports_missing_runs_without_training(tiny_table, tmp_path):
    out = tmp_path / "tiny"
    result = run_study("tiny", out, train=False)
    assert result["trained"] == 0 and result["finished"] == 0
    page = (out / "README.md").read_text()
    assert "**Incomplete**: 8 runs not finished" in page
    assert not (out / "short" / "rope" / "seed0" / "results.json").exists()


def test_a_finished_run_of_another_config_stops_the_table_before_training(tiny_table, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    run_study("tiny", out, seeds=[0], jobs=1)
    changed = Part(
        name="short", preset="smoke", paper_preset="flipflop_paper", overrides=(*FAST, "train.lr=0.01")
    )
    monkeypatch.setitem(
        STUDIES, "tiny", Study(**{**tiny_table.__dict__, "parts": (changed, tiny_table.parts[1])})
    )
    before = sorted(p.name for p in (out / "short").rglob("*"))
    with pytest.raises(ValueError, match="different config.*train.lr"):
        run_study("tiny", out, seeds=[0], jobs=1)
    assert sorted(p.name for p in (out / "short").rglob("*")) == before


def test_cli_reproduce_errors_are_one_line_with_exit_2(tiny_table, tmp_path, capsys):
    assert main(["reproduce", "nosuch", "--out", str(tmp_path / "x")]) == 2
    assert "unknown study 'nosuch'" in capsys.readouterr().err
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


# -- length generalisation: columns at one evaluated length ----------------------------------------


def test_length_generalisation_table_scores_validation_at_1x_and_2_5x(tmp_path):
    table = get_study("cope_length_generalisation")
    assert [spec for _, spec in table.rows] == [
        "relative", "cope", "cope[npos_max=8]", "cope+relative", "dape[base=kerple_log]",
    ]  # fmt: skip
    assert table.columns == ["python_docs/validation@128", "python_docs/validation@320"]
    one, two_and_a_half = table.columns
    assert table.numbers["Relative"] == {one: 22.90, two_and_a_half: 24.2}
    # CoPE at the paper's npos_max and at its ratio to the context (64 x 128 / 1024), both against
    # the paper's one CoPE row
    assert table.numbers["CoPE, npos_max 64 (the paper's)"] == {one: 22.55, two_and_a_half: 21.6}
    assert table.numbers["CoPE, npos_max 8 (the paper's ratio)"] == {one: 22.55, two_and_a_half: 21.6}
    assert not table.numbers_check.verified
    assert table.ratio == ("python_docs/validation@320", "python_docs/validation@128")
    for scale in ("cpu", "paper"):
        config = part_config(table.parts[0], scale)
        task = config.task.build()
        assert config.task.train_len == 128 and config.eval.splits == ("validation",)
        assert task.split_lengths("validation") == (128, 320) and task.split_lengths("id") is None
        assert task.corpus == "python_docs" and task.tokenizer == "bpe"
    grids = plan_study(table, tmp_path / "t", [0])  # the columns' lengths are the ones scored
    assert len(grids["python_docs"]) == 5 and not (tmp_path / "t").exists()


LENGTHS = ("validation@16", "validation@40")
LENGTH_COLUMNS = ("files/validation@16", "files/validation@40")


def _lm_table(tmp_path: Path, splits: tuple[str, ...], eval_lengths: str | None = "16,40") -> Study:
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
    part = Part(
        name="files",
        preset="lm_stdlib_small",
        paper_preset="lm_paper_128",
        overrides=overrides,
        splits=splits,
    )
    full = splits == LENGTHS
    return Study(
        kind=TASK_TABLE,
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
    monkeypatch.setitem(STUDIES, "tiny_lm", _lm_table(tmp_path, ("validation@16", "validation@32")))
    with pytest.raises(ValueError, match="validation@32: the runs score validation at 16, 40, not at 32"):
        run_study("tiny_lm", out)
    monkeypatch.setitem(STUDIES, "tiny_lm", _lm_table(tmp_path, ("validation@16",), eval_lengths=None))
    with pytest.raises(ValueError, match="not scored per length by 'lm'.*eval_lengths"):
        run_study("tiny_lm", out)
    assert not out.exists()
    with pytest.raises(ValueError, match="length after '@' must be a positive integer"):
        _lm_table(tmp_path, ("validation@long",))
    with pytest.raises(ValueError, match="ratio must be two of its columns"):
        Study(**{**_lm_table(tmp_path, LENGTHS).__dict__, "ratio": (LENGTH_COLUMNS[1], "files/test")})


def test_length_columns_end_to_end_are_full_context_perplexities(tmp_path, monkeypatch):
    table = _lm_table(tmp_path, LENGTHS)
    monkeypatch.setitem(STUDIES, "tiny_lm", table)
    out = tmp_path / "out"
    result = run_study("tiny_lm", out, jobs=1)
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
    stats = interval(ratios)
    line = next(ln for ln in page.splitlines() if ln.startswith("| RoPE | "))
    ours = f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}] (2)"
    assert line.split(" | ")[-2:] == [ours, "1.250* |"]
    nope = next(ln for ln in page.splitlines() if ln.startswith("| No PE | "))
    assert nope.endswith(" | – |")  # no paper numbers, no paper ratio


# -- the Chomsky hierarchy: best seeds, levels and chance, accuracy per length ---------------------

DAPE_CHOMSKY_SPECS = [
    "nope",
    "rope",
    "alibi",
    "kerple_log",
    "fire",
    "dape[base=kerple_log]",
    "dape[base=fire]",
    "cope",
]


def _docs_chomsky_table() -> list[tuple[str, str, float]]:
    """(level, task, chance %) of each line of docs/tasks.md's Chomsky-hierarchy table, in order."""
    text = (Path(__file__).parents[3] / "docs" / "tasks.md").read_text()
    lines = []
    for line in text.split("## Encoder tasks")[1].split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[3].endswith("%"):
            lines.append((cells[0], cells[1], float(cells[3].rstrip("%"))))
    return lines


def test_dape_chomsky_has_the_fifteen_tasks_of_docs_with_their_levels_and_chances(tmp_path):
    table = get_study("dape_chomsky")
    assert [spec for _, spec in table.rows] == DAPE_CHOMSKY_SPECS
    assert table.metric == "accuracy" and table.best and table.plot == ("id", "ood")
    assert table.numbers == {}  # none found; never typed in from memory
    docs = _docs_chomsky_table()
    assert len(docs) == 15 and [part.name for part in table.parts] == [task for _, task, _ in docs]
    for (level, name, chance), part in zip(docs, table.parts, strict=True):
        assert part.splits == ("ood",)
        for scale in ("cpu", "paper"):
            config = part_config(part, scale)
            task = config.task.build()
            assert task.name == name and not task.causal
            assert task.level.replace("_", "-") == level and task.chance == pytest.approx(chance)
            assert task.split_lengths("id") == range(1, 41)
            for spec in DAPE_CHOMSKY_SPECS:  # every encoding runs in the bidirectional encoder
                config.override({"model.encoding": spec}).model_config(task).build_encoding()
    cpu, paper = part_config(table.parts[0], "cpu"), part_config(table.parts[0], "paper")
    assert cpu.task.build().split_lengths("ood") == range(41, 101)
    assert paper.task.build().split_lengths("ood") == range(41, 501)
    m, t = paper.model, paper.train
    assert (m.n_layers, m.d_model, m.n_heads, t.batch_size, t.lr) == (5, 256, 8, 128, 1e-4)
    grids = plan_study(table, tmp_path / "t", [0, 1, 2])
    assert sum(len(grid) for grid in grids.values()) == 360 and not (tmp_path / "t").exists()
    # The page's setting: one line for the fifteen parts, which differ only in their task.
    page = run_study("dape_chomsky", tmp_path / "page", train=False)["page"]
    setting = [ln for ln in page.splitlines() if "preset `chomsky_cpu`" in ln]
    assert len(setting) == 1 and setting[0].startswith("- Each part `<part>` of `even_pairs`, ")
    assert "with task.name=<part> (paper scale: `chomsky_paper`): <part>(max_train_len=40" in setting[0]
    assert "trained on lengths 1-40, scored at id 1-40, every 6th; ood 41-100, every 6th" in setting[0]


def test_best_tables_and_plots_are_checked_before_anything_trains(tmp_path, monkeypatch):
    base = get_study("dape_chomsky")
    with pytest.raises(ValueError, match="plot names whole splits"):
        Study(**{**base.__dict__, "plot": ("ood@50",)})
    with pytest.raises(ValueError, match="learned names a whole split of a table with best seeds"):
        Study(**{**base.__dict__, "learned": "id@20"})
    with pytest.raises(ValueError, match="learned names a whole split of a table with best seeds"):
        Study(**{**get_study("cope_flipflop").__dict__, "learned": "id"})
    with pytest.raises(ValueError, match="best seeds has no ratio"):
        Study(**{**base.__dict__, "ratio": ("even_pairs/ood", "parity_check/ood")})
    flipflop = get_study("cope_flipflop")
    monkeypatch.setitem(
        STUDIES, "plotted", Study(**{**flipflop.__dict__, "name": "plotted", "plot": ("id",)})
    )
    with pytest.raises(ValueError, match="part flipflop: cannot plot 'id' per length"):
        run_study("plotted", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _chomsky_table(task: str = "parity_check", overrides: tuple[str, ...] = ()) -> Study:
    return Study(
        kind=TASK_TABLE,
        name="tiny_chomsky",
        title="Tiny Chomsky",
        source="a test",
        metric="accuracy",
        rows=(("NoPE", "nope"), ("DAPE-FIRE", "dape[base=fire]")),
        parts=(
            Part(
                name=task,
                preset="chomsky_cpu",
                paper_preset="chomsky_paper",
                overrides=(f"task.name={task}", *overrides),
                splits=("ood",),
            ),
        ),
        numbers={"DAPE-FIRE": {f"{task}/ood": 52.5}},
        seeds=(0, 1),
        best=True,
        plot=("id", "ood"),
        learned="id",
    )


def _fake_run(run, ood: float, lengths: dict[str, dict[int, float]], id_: float = 99.0) -> None:
    """A finished run's files as training writes them, with hand-made accuracies."""
    run.run_dir.path.mkdir(parents=True)
    run.run_dir.write_config(run.config)
    per_length = {s: {str(n): {"accuracy": v} for n, v in vs.items()} for s, vs in lengths.items()}
    metrics = {"splits": {"id": {"accuracy": id_}, "ood": {"accuracy": ood}}, "lengths": per_length}
    run.run_dir.write_results(
        {"metrics": metrics, "wall_time": 1.0, "machine": {"cpu": "hand", "threads": 1}}
    )


def test_the_best_page_shows_each_cells_best_seed_mean_level_chance_and_the_plot(tmp_path, monkeypatch):
    table = _chomsky_table()
    monkeypatch.setitem(STUDIES, "tiny_chomsky", table)
    out = tmp_path / "out"
    grid = plan_study(table, out, [0, 1])["parity_check"]
    runs = {(run.config.encoding_label, run.config.train.seed): run for run in grid}
    _fake_run(runs[("nope", 0)], 60.0, {"id": {1: 100.0, 40: 90.0}, "ood": {41: 70.0, 100: 50.0}}, 95.0)
    _fake_run(runs[("nope", 1)], 80.0, {"id": {1: 100.0, 40: 96.0}, "ood": {41: 90.0, 100: None}}, 98.0)
    _fake_run(runs[("dape[base=fire]", 1)], 55.5, {"id": {40: 99.0}, "ood": {41: 55.5}}, 51.25)
    result = run_study("tiny_chomsky", out, train=False)
    assert (result["finished"], result["planned"]) == (3, 4)
    page = (out / "README.md").read_text()
    assert "| level | task | chance (floor) | NoPE | DAPE-FIRE |" in page
    # parity check is permutation-invariant (†); its chance (50) and, where above it, the floor of
    # answering one class throughout on the scored sequences
    floors = {split: position_blind_floor(grid[0].config, split) for split in ("ood", "id")}
    chance = {s: "50" + (f" ({f:.1f})" if f > 50.5 else "") for s, f in floors.items()}
    line = next(ln for ln in page.splitlines() if ln.startswith("| regular | parity_check † |"))
    nope, dape = f"**80.00** / 70.00 ± {20 / 2**0.5:.2f} (2)", "**55.50** / 55.50 (1) / paper 52.5*"
    assert line == f"| regular | parity_check † | {chance['ood']} | {nope} | {dape} |"
    # ... and a second table, the mean at the training lengths: did each model learn the task?
    learned = page.split("### At the training lengths (id)")[1]
    line = next(ln for ln in learned.splitlines() if ln.startswith("| regular | parity_check † |"))
    assert line == f"| regular | parity_check † | {chance['id']} | 96.50 ± {3 / 2**0.5:.2f} (2) | 51.25 (1) |"
    # Every seed includes the training lengths' values.
    seeds = page.split("## Every seed")[1]
    assert "| NoPE | parity_check/id | 95.00 | 98.00 |" in seeds
    assert "parity_check/id" in (out / "results.csv").read_text()
    # Accuracy per length: the mean over the seeds that scored each length; the id split ends at 40.
    curves, boundary = length_curves(table, grid)
    assert curves["NoPE"] == {1: 100.0, 40: 93.0, 41: 80.0, 100: 50.0}
    assert curves["DAPE-FIRE"] == {40: 99.0, 41: 55.5} and boundary == 40
    assert "![parity_check](plots/parity_check.png)" in page
    assert (out / "plots" / "parity_check.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tiny_chomsky_table_end_to_end_scores_pooled_per_token_accuracy(tmp_path, monkeypatch):
    small = ("model.d_model=16", "model.n_heads=2", "task.options.max_eval_len=46", "eval.batch_size=8")
    table = _chomsky_table("reverse_string", (*FAST, *small))
    monkeypatch.setitem(STUDIES, "tiny_chomsky", table)
    out = tmp_path / "out"
    result = run_study("tiny_chomsky", out, jobs=1)
    assert (result["finished"], result["planned"], result["trained"]) == (4, 4, 4)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {r["column"] for r in rows} == {"reverse_string/ood", "reverse_string/id"}
    rows = [r for r in rows if r["column"] == "reverse_string/ood"]
    # The ood value is the mean over the tested lengths (41, 46: every 6th and the last) of the
    # accuracy pooled over all output tokens of the length's batch, here recomputed from the model.
    run = next(r for r in rows if r["encoding"] == "dape[base=fire]" and r["seed"] == "1")
    loaded = RunDir(run["run_dir"]).load_model()
    pooled = []
    for length in (41, 46):
        generator = torch.Generator().manual_seed(eval_seed(0, "ood", length))
        batch = loaded.task.sample(8, length, generator=generator, **loaded.task.splits()["ood"])
        with torch.no_grad():
            predicted = loaded.model(batch.inputs).argmax(-1)
        correct = (predicted == batch.targets) & batch.mask
        pooled.append(100 * correct.sum().item() / batch.mask.sum().item())
    assert batch.mask.sum().item() == 8 * 46  # reverse_string: one output token per input token
    assert float(run["value"]) == pytest.approx(sum(pooled) / 2)
    # Each cell: the best of the two seeds, then their mean ± std, as the CSV has them.
    page = (out / "README.md").read_text()
    values = [float(r["value"]) for r in rows if r["encoding"] == "nope"]
    line = next(ln for ln in page.splitlines() if ln.startswith("| context-free | reverse_string | 50 ("))
    assert line.split(" | ")[3].startswith(f"**{max(values):.2f}** / {sum(values) / 2:.2f} ± ")
    assert (out / "plots" / "reverse_string.png").is_file()


def test_chomsky_grids_start_the_longest_sequences_first():
    # The Chomsky tasks draw a length per batch (no task.train_len): the estimate counts a sequence at
    # the longest training length, input and output (it used to raise TypeError on the None).
    table = get_study("dape_chomsky")
    parts = {part.name: part for part in table.parts}
    cost = {
        name: estimated_cost(part_config(parts[name], "cpu").override({"model.encoding": "nope"}))
        for name in ("parity_check", "reverse_string", "duplicate_string")
    }
    assert cost["parity_check"] * 80 == cost["reverse_string"] * 41  # 41 tokens (one output) vs 80
    assert cost["duplicate_string"] * 80 == cost["reverse_string"] * 120


def test_a_small_grid_starts_in_the_order_that_ends_soonest():
    # List scheduling on two workers: slowest first ends at 3.65; the searched order at 3.27, the
    # best split ({1.65, 1.55} against {1.27, 1, 1}), which no order can beat.
    costs = [1.0, 1.65, 1.27, 1.55, 1.0]
    assert makespan([3.0, 2.0, 2.0], 2) == 4.0 and makespan([1.0, 3.0, 1.0], 2) == 3.0
    assert makespan(costs, 1) == pytest.approx(sum(costs)) and makespan(costs, 5) == 1.65
    assert makespan(sorted(costs, reverse=True), 2) == pytest.approx(3.65)
    order = start_order(costs, 2)
    assert sorted(order) == list(range(5)) and makespan([costs[i] for i in order], 2) == pytest.approx(3.27)
    splits = [
        [sum(c for i, c in enumerate(costs) if (m >> i & 1) == side) for side in (0, 1)] for m in range(32)
    ]
    best_split = min(max(split) for split in splits)
    assert best_split == pytest.approx(3.27)
    # Slowest first where the search has nothing to gain, for one worker and past search_up_to.
    assert start_order(costs, 1) == [1, 3, 2, 0, 4] == start_order(costs, 2, search_up_to=4)
    assert start_order([2.0, 2.0, 2.0, 2.0], 2) == [0, 1, 2, 3]  # ties keep the grid's order
    g = torch.Generator().manual_seed(0)
    for n in range(3, 8):
        costs = (torch.rand(n, generator=g) + 0.5).tolist()
        lpt = makespan(sorted(costs, reverse=True), 2)
        assert makespan([costs[i] for i in start_order(costs, 2)], 2) <= lpt


def test_the_demo_starts_its_two_slowest_runs_on_the_same_worker():
    # CoPE and DAPE cost 1.5-1.65x RoPE's run at the demo's shape, ALiBi 1.3x: started together, the
    # slowest-first order left RoPE alone at the end (646 s for the main job; this order ~570 s).
    base = get_preset("flipflop_demo")
    costs = [estimated_cost(base.override({"model.encoding": spec})) for spec in DEMO_ENCODINGS]
    order = [DEMO_ENCODINGS[i] for i in start_order(costs, 2)]
    assert order[0] in ("cope", "dape") and order[1] == "alibi" and order[3] in ("cope", "dape")


def test_a_table_trains_seed_by_seed_so_a_stopped_grid_is_balanced(tiny_table, tmp_path, monkeypatch):
    from poslab.lab.studies import runner

    order, calls = [], []
    monkeypatch.setattr(
        runner, "train_grid", lambda todo, **kwargs: calls.append(len(todo)) or order.extend(todo) or []
    )
    run_study("tiny", tmp_path / "t", seeds=[0, 1])
    seen = [(run.path.parent.parent.name, run.path.parent.name, run.config.train.seed) for run in order]
    assert [s for *_, s in seen] == [0] * 4 + [1] * 4 and calls == [4, 4]  # one grid per seed
    # within a seed, parts then rows in the study's order
    assert [p for p, *_ in seen[:4]] == ["short", "short", "shorter", "shorter"]
    assert [e for _, e, _ in seen[:4]] == ["nope", "rope", "nope", "rope"]


def test_a_study_rerun_with_other_steps_is_refused_naming_the_key(tiny_table, tmp_path, capsys):
    """Issue 31: 'reproduce ... train.steps=3' then 'train.steps=4' reported 4 of 4 runs finished
    and labelled 3-step runs with 4 steps."""
    out = str(tmp_path / "t")
    base = ["reproduce", "tiny", "--out", out, "--seeds", "0", "--jobs", "1", "--no-progress"]
    assert main([*base, "train.steps=3"]) == 0
    capsys.readouterr()
    before = (tmp_path / "t" / "README.md").read_text()
    assert main([*base, "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poslab: error:") and "train.steps" in err and err.count("\n") == 1
    assert (tmp_path / "t" / "README.md").read_text() == before


def test_a_page_is_built_while_another_process_trains_but_training_is_refused(tiny_table, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "t"
    run_study("tiny", out, seeds=[0], jobs=1)
    busy = out / "short" / "rope" / "seed1"
    busy.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (busy / ".lock").write_text(f"{writer.pid}\n")  # a live process writes seed 1
        result = run_study("tiny", out, seeds=[0, 1], train=False)
        assert result["finished"] == 4 and result["planned"] == 8 and result["trained"] == 0
        with pytest.raises(ValueError, match=f"being written by process {writer.pid}"):
            run_study("tiny", out, seeds=[0, 1], jobs=1)
    finally:
        writer.kill()
        writer.wait()


# -- the data file: the page from it alone, resuming from it ---------------------------------------


def _delete_run_folders(out: Path) -> None:
    for run in sorted(out.rglob("seed*")):
        if run.is_dir():
            shutil.rmtree(run)


def test_a_table_resumes_from_its_data_file_alone(tiny_table, tmp_path):
    """A clean clone holds the data file and no run folder: the recorded runs count as finished and
    only the missing ones train; the data file only grows."""
    out = tmp_path / "tiny"
    run_study("tiny", out, seeds=[0], jobs=1)
    before = (out / DATA).read_bytes()
    assert before.count(b"\n") == 4
    _delete_run_folders(out)
    result = run_study("tiny", out, seeds=[0, 1], jobs=1)
    assert (result["trained"], result["finished"], result["planned"]) == (4, 8, 8)
    after = (out / DATA).read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 8
    assert not (out / "short" / "rope" / "seed0").exists()  # seed 0 was not trained again
    assert "8 of 8 runs finished" in result["page"]
    again = run_study("tiny", out, seeds=[0, 1], jobs=1, train=False)
    assert again["page"] == result["page"] and (out / DATA).read_bytes() == after  # nothing appended


def test_a_recorded_run_of_another_config_is_refused_before_anything_trains(tiny_table, tmp_path, capsys):
    out = tmp_path / "t"
    base = ["study", "tiny", "--out", str(out), "--seeds", "0", "--jobs", "1", "--no-progress"]
    assert main([*base, "train.steps=3"]) == 0
    _delete_run_folders(out)
    capsys.readouterr()
    data = (out / DATA).read_bytes()
    assert main([*base, "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"poslab: error: {out / DATA}:1 records short/nope/seed0 with a different config")
    assert "(train.steps)" in err and err.count("\n") == 1
    assert (out / DATA).read_bytes() == data and not list(out.rglob("seed*"))


def test_the_page_from_the_data_file_is_the_page_from_the_folders(tmp_path, monkeypatch):
    table = _chomsky_table()
    monkeypatch.setitem(STUDIES, "tiny_chomsky", table)
    out = tmp_path / "out"
    runs = {
        (run.config.encoding_label, run.config.train.seed): run
        for run in plan_study(table, out, [0, 1])["parity_check"]
    }
    _fake_run(runs[("nope", 0)], 60.0, {"id": {1: 100.0, 40: 90.0}, "ood": {41: 70.0, 100: 50.0}}, 95.0)
    _fake_run(runs[("nope", 1)], 80.0, {"id": {1: 100.0, 40: 96.0}, "ood": {41: 90.0, 100: None}}, 98.0)
    _fake_run(runs[("dape[base=fire]", 1)], 55.5, {"id": {40: 99.0}, "ood": {41: 55.5}}, 51.25)
    from_folders = run_study("tiny_chomsky", out, train=False)["page"]
    csv_text, data = (out / "results.csv").read_bytes(), (out / DATA).read_bytes()
    assert data.count(b"\n") == 3
    _delete_run_folders(out)
    shutil.rmtree(out / "plots")
    result = run_study("tiny_chomsky", out, train=False)
    assert result["page"] == from_folders == (out / "README.md").read_text() and result["finished"] == 3
    assert (out / "results.csv").read_bytes() == csv_text and (out / DATA).read_bytes() == data
    assert (out / "plots" / "parity_check.png").read_bytes()[:4] == b"\x89PNG"
