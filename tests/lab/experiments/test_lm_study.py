"""``poslab lm-study``: the DAPE paper's language-model studies as lm-extrapolation grids and a page."""

from __future__ import annotations

import csv
import io
import json

import pytest
from test_extrapolation import write_corpus

from poslab.encodings import build_encoding
from poslab.lab.cli import main
from poslab.lab.experiments.lm_studies import STUDIES, LMStudy, PaperNumber, StudyPart, get_study
from poslab.lab.experiments.lm_study import run_study
from poslab.lab.presets import get_preset
from poslab.lab.report.common import mean_std, stats_cell

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_studies_hold_what_the_issue_asks_for():
    extrapolation = get_study("dape_extrapolation")
    specs = [spec for _, spec in extrapolation.rows]
    assert specs == [
        "nope", "rope", "t5", "alibi", "kerple_log", "fire", "dape[base=alibi]", "dape[base=kerple_log]",
        "dape[base=fire]", "dape[base=kerple_log,kernel_size=3]", "cope",
    ]  # fmt: skip
    assert extrapolation.factor == 64 and extrapolation.seeds == (0, 1, 2)
    prose = get_preset("lm_stdlib_small").override(list(extrapolation.parts[1].overrides))
    assert (prose.task.options["corpus"], prose.task.options["tokenizer"]) == ("python_docs", "bpe")
    # Every row of every study builds (the ablation's forms and V2 included).
    for study in STUDIES.values():
        for _, spec in study.rows:
            assert build_encoding(spec, n_heads=4, head_dim=32).n_heads == 4
    scale = get_study("dape_scale")
    widths = {p.name: get_preset(p.preset).override(list(p.overrides)).model.d_model for p in scale.parts}
    steps = {p.name: get_preset(p.preset).override(list(p.overrides)).train.steps for p in scale.parts}
    lrs = {p.name: get_preset(p.preset).override(list(p.overrides)).train.lr for p in scale.parts}
    assert widths == {"x1": 128, "x4": 256, "x16": 512, "x1_steps4": 128, "x4_steps4": 256, "x16_lr1e-3": 512}
    assert steps == {name: 2400 if name.endswith("steps4") else 600 for name in widths}
    assert lrs == {**{name: 3e-3 for name in widths if name != "x16_lr1e-3"}, "x16_lr1e-3": 1e-3}
    assert scale.gap == ("DAPE-Kerple", "Kerple")
    widths = [build_encoding(spec, n_heads=4, head_dim=32) for _, spec in get_study("dape_width").rows[1:]]
    assert [e.width for e in widths] == [4, 16, 32, 64]
    forms = [build_encoding(spec, n_heads=4, head_dim=32) for _, spec in get_study("dape_ablation").rows[1:]]
    assert [e.form for e in forms] == ["A+f(B)", "A+f(A,B)", "A+B+f(A,B)"]


def _study(**changes) -> LMStudy:
    fields = dict(
        name="tiny",
        title="Tiny",
        source="a test",
        rows=(("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")),
        parts=(StudyPart(name="a", preset="lm_stdlib_small"),),
        paper_setting="none",
        factor=4,
        seeds=(0, 1),
        gap=("DAPE-Kerple", "Kerple"),
        numbers=(PaperNumber(setting="big", row="Kerple", train_len=128, length=512, value=31.5),),
    )
    return LMStudy(**{**fields, **changes})


def test_a_bad_study_fails_when_defined():
    with pytest.raises(ValueError, match="gap must name two of its rows"):
        _study(gap=("DAPE-Kerple", "ALiBi"))
    with pytest.raises(ValueError, match="factor must be a power of two, got 48"):
        _study(factor=48)
    with pytest.raises(ValueError, match=r"paper numbers for rows it does not have: \['RoPE'\]"):
        _study(numbers=(PaperNumber(setting="big", row="RoPE", train_len=128, length=512, value=3.0),))
    with pytest.raises(ValueError, match="its own name and spec"):
        _study(rows=(("Kerple", "kerple_log"), ("Kerple again", "kerple_log")), gap=None, numbers=())
    with pytest.raises(ValueError, match="two parts share a name"):
        _study(parts=(StudyPart(name="a", preset="lm_stdlib_small"),) * 2)
    with pytest.raises(
        ValueError, match="unknown study 'dape_nothing'; known studies: dape_ablation, dape_extrapolation"
    ):
        get_study("dape_nothing")


def _tiny_overrides(corpus) -> list[str]:
    return [
        "task.options.corpus=files",
        f"task.options.corpus_options.path={corpus}",
        "task.options.fractions=0.6,0.2,0.2",
        "task.train_len=16",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_len=16",
        "train.steps=3",
        "train.batch_size=4",
        "train.warmup=1",
        "train.checkpoint_every=0",
        "train.device=cpu",
        "eval.batches=1",
        "eval.batch_size=4",
    ]


def test_a_study_end_to_end_resumes_and_shows_the_gap_and_the_paper(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    parts = (
        StudyPart(name="a", preset="lm_stdlib_small"),
        StudyPart(name="b", preset="lm_stdlib_small", overrides=("model.n_layers=1",)),
    )
    monkeypatch.setitem(STUDIES, "tiny", _study(parts=parts))
    out = tmp_path / "out"
    result = run_study("tiny", out, overrides=_tiny_overrides(corpus), max_windows=2, plots=False)
    page = (out / "README.md").read_text()
    assert page == result["page"]
    for name in ("a", "b"):
        assert result["results"][name]["settings"]["lengths"] == [16, 32, 64]  # up to factor x 16
        assert (out / name / "results.json").is_file()
    # The gap per part is DAPE-Kerple minus Kerple at 64, paired by seed.
    res = result["results"]["b"]
    at = {(r["encoding"], r["seed"]): r["results"]["64"]["ppl_last"] for r in res["runs"]}
    gaps = [at["dape[base=kerple_log]", s] - at["kerple_log", s] for s in (0, 1)]
    gap_row = next(line for line in page.splitlines() if line.startswith("| b | "))
    assert f"{gaps[0]:+.2f}, {gaps[1]:+.2f}" in gap_row and "| 64 |" in gap_row
    n_params = {r["n_params"] for r in res["runs"] if r["encoding"] == "kerple_log"}
    lr = get_preset("lm_stdlib_small").override(_tiny_overrides(corpus)).train.lr
    assert f"| b | {n_params.pop()} | 3 | {lr:g} | 64 |" in gap_row
    # ... and beside it the same gap at the training length (16), paired by seed.
    at16 = {(r["encoding"], r["seed"]): r["results"]["16"]["ppl_last"] for r in res["runs"]}
    train_gap = mean_std([at16["dape[base=kerple_log]", s] - at16["kerple_log", s] for s in (0, 1)])
    assert gap_row.endswith(f"| {stats_cell(train_gap)} |")
    # The paper's 512 from 128 (4x) sits beside ours at 64 (4 x 16).
    paper_row = next(line for line in page.splitlines() if line.startswith("| big | Kerple |"))
    assert "| 512 (4x) | 31.50 |" in paper_row and paper_row.count(" at 64") == 2
    # Every seed at the longest length, and the command.
    assert f"| Kerple | {at['kerple_log', 0]:.2f} | {at['kerple_log', 1]:.2f} |" in page
    assert "poslab lm-study tiny --out" in page
    assert "Compute: training 0.00 h and scoring 0.00 h" in page
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 2 * 2 * 2 * 3  # parts x rows x seeds x lengths
    assert {row["row"] for row in rows} == {"Kerple", "DAPE-Kerple"}

    # Rerunning trains and scores nothing again (runs and scores are reused); other windows rescore
    # without retraining; --page-only rebuilds the same page.
    checkpoint = next((out / "a" / "runs").rglob("checkpoint.pt"))
    mtimes = checkpoint.stat().st_mtime_ns, (out / "a" / "results.json").stat().st_mtime_ns
    again = run_study("tiny", out, overrides=_tiny_overrides(corpus), max_windows=2, plots=False)
    assert (checkpoint.stat().st_mtime_ns, (out / "a" / "results.json").stat().st_mtime_ns) == mtimes
    assert again["page"] == page
    one = run_study("tiny", out, overrides=_tiny_overrides(corpus), max_windows=1, plots=False)
    assert checkpoint.stat().st_mtime_ns == mtimes[0]
    assert set(one["results"]["a"]["settings"]["windows"].values()) == {1}
    run_study("tiny", out, overrides=_tiny_overrides(corpus), max_windows=2, plots=False)
    rebuilt = run_study("tiny", out, train=False, command="poslab lm-study tiny --out X")
    assert rebuilt["page"].replace("--out X", f"--out {out}") == page
    # The reading comes from notes.md, at the end of the page, and survives rebuilds.
    assert page.endswith("## Reading\n\n_Not written yet._\n")
    (out / "notes.md").write_text("\nKerple stays flat here.\n\n")
    noted = run_study("tiny", out, train=False)["page"]
    assert noted == page.replace("_Not written yet._", "Kerple stays flat here.")
    assert (out / "README.md").read_text() == noted
    (out / "notes.md").write_bytes(b"\xff\xfe broken")
    with pytest.raises(ValueError, match=r"cannot read .*notes\.md"):
        run_study("tiny", out, train=False)
    assert (out / "README.md").read_text() == noted  # the page written before is kept
    assert json.loads((out / "a" / "results.json").read_text())["settings"]["lengths"] == [16, 32, 64]


def test_lm_study_command_errors(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--max-windows", "0"]) == 2
    assert capsys.readouterr().err == "poslab: error: --max-windows must be a positive integer, got 0\n"
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--page-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poslab: error: no part of study 'dape_ablation' has results in")
    assert err.count("\n") == 1
    assert main(["lm-study", "dape_ablation", "--out", str(out), "--page-only", "train.steps=x"]) == 2
    assert capsys.readouterr().err.startswith("poslab: error: ")
    with pytest.raises(SystemExit) as exit_:
        main(["lm-study", "dape_nothing", "--out", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'dape_nothing'" in capsys.readouterr().err
    assert not out.exists()
