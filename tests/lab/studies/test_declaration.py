"""Studies as data: a bad declaration fails when it is made, and every study is registered."""

from __future__ import annotations

import pytest

from poslab.encodings import build_encoding, list_encodings
from poslab.lab.presets import get_preset
from poslab.lab.studies.declaration import (
    LM_EXTRAPOLATION,
    NPOS_AT_PAPER_RATIO,
    STUDIES,
    TASK_TABLE,
    PaperNumber,
    Part,
    Study,
    get_study,
)


def test_table_numbers_must_name_its_rows_and_columns():
    part = Part(name="p", preset="smoke", paper_preset="smoke")
    with pytest.raises(ValueError, match="rows it does not have"):
        Study(
            kind=TASK_TABLE,
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"B": {"p/id": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown columns"):
        Study(
            kind=TASK_TABLE,
            name="x",
            title="",
            source="",
            metric="error",
            rows=(("A", "nope"),),
            parts=(part,),
            numbers={"A": {"p/ood": 1.0}},
        )
    with pytest.raises(ValueError, match="unknown study 'nope'; known studies: .*cope_flipflop"):
        get_study("nope")


def test_module_tables_are_registered_under_their_names():
    assert all(name == table.name for name, table in STUDIES.items())


def tiny_lm_study(**changes) -> Study:
    """A two-row LM study on `lm_stdlib_small`, with ``changes``."""
    fields = dict(
        kind=LM_EXTRAPOLATION,
        name="tiny",
        title="Tiny",
        source="a test",
        rows=(("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")),
        parts=(Part(name="a", preset="lm_stdlib_small"),),
        paper_setting="none",
        factor=4,
        seeds=(0, 1),
        gap=("DAPE-Kerple", "Kerple"),
        pairs=(("DAPE-Kerple", "Kerple"),),
        paper_numbers=(PaperNumber(setting="big", row="Kerple", train_len=128, length=512, value=31.5),),
    )
    return Study(**{**fields, **changes})


def test_a_bad_study_fails_when_defined():
    with pytest.raises(ValueError, match="gap must name two of its rows"):
        tiny_lm_study(gap=("DAPE-Kerple", "ALiBi"))
    with pytest.raises(ValueError, match="factor must be a power of two, got 48"):
        tiny_lm_study(factor=48)
    with pytest.raises(ValueError, match=r"paper numbers for rows it does not have: \['RoPE'\]"):
        tiny_lm_study(
            paper_numbers=(PaperNumber(setting="big", row="RoPE", train_len=128, length=512, value=3.0),)
        )
    with pytest.raises(ValueError, match="its own name and spec"):
        tiny_lm_study(
            rows=(("Kerple", "kerple_log"), ("Kerple again", "kerple_log")), gap=None, paper_numbers=()
        )
    with pytest.raises(ValueError, match="two parts share a name"):
        tiny_lm_study(parts=(Part(name="a", preset="lm_stdlib_small"),) * 2)
    with pytest.raises(
        ValueError,
        match="unknown study 'dape_nothing'; known studies: cope_code_lm, .*dape_ablation, dape_chomsky",
    ):
        get_study("dape_nothing")


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


def test_a_study_is_one_kind_and_holds_only_that_kinds_fields():
    with pytest.raises(ValueError, match="kind must be one of task table, lm extrapolation"):
        tiny_lm_study(kind="table")
    with pytest.raises(ValueError, match="belong to a task table"):
        tiny_lm_study(numbers={"Kerple": {"a/id": 1.0}})
    flipflop = get_study("cope_flipflop")
    with pytest.raises(ValueError, match="belong to an LM"):
        Study(**{**flipflop.__dict__, "gap": ("RoPE", "CoPE")})
    kinds = {name: study.kind for name, study in STUDIES.items()}
    assert {name for name, kind in kinds.items() if kind == LM_EXTRAPOLATION} == {
        "cope_length_generalisation_512", "dape_ablation", "dape_deep", "dape_extrapolation", "dape_scale",
        "dape_width",
    }  # fmt: skip
    with pytest.raises(ValueError, match="lengths and aligned belong to an LM"):
        Study(**{**flipflop.__dict__, "aligned": True})
    for bad in ((), (2, 1), (0.5, 1), (1, 1)):
        with pytest.raises(ValueError, match="lengths must be increasing multiples >= 1"):
            tiny_lm_study(lengths=bad)
    assert tiny_lm_study(lengths=(1, 2.5)).scored_lengths(128) == [128, 320]
    assert tiny_lm_study().scored_lengths(128) == [128, 256, 512]  # factor 4
    deep = get_study("dape_deep")
    assert deep.aligned and deep.scored_lengths(128) == [128, 512, 2048, 8192]
    assert {"cope_flipflop", "cope_counting", "dape_chomsky", "demo"} <= set(kinds)


def test_the_demo_is_the_flip_flop_table_with_the_demos_encodings():
    demo, flipflop = get_study("demo"), get_study("cope_flipflop")
    assert demo.kind == TASK_TABLE and demo.seeds == (0,)
    assert demo.specs == ["learned", "rope", "alibi", "cope", "dape"]
    assert demo.parts == flipflop.parts and demo.numbers == flipflop.numbers


def test_the_quick_benchmark_is_a_subset_of_the_benchmark_run_as_it_is():
    # Each cell of the quick study must be the benchmark's own cell made again: same rows (name and
    # spec), same preset, overrides and splits, seeds among the benchmark's.
    full, quick = get_study("length_generalisation"), get_study("length_generalisation_quick")
    assert set(quick.rows) < set(full.rows) and len(quick.rows) >= 3
    assert quick.reference == full.reference and quick.metric == full.metric
    parts = {part.name: part for part in full.parts}
    for part in quick.parts:
        assert part == parts[part.name]
    assert set(quick.seeds) < set(full.seeds)
    # Sinusoidal as published: the token embeddings are scaled by sqrt(d) before the table is added
    specs = dict(full.rows)
    assert build_encoding(specs["Sinusoidal (embeddings x sqrt(d))"], n_heads=4, head_dim=16).scale_embeddings


def test_the_benchmark_has_every_registered_encoding_as_published_and_labels_its_variants():
    specs = dict(get_study("length_generalisation").rows)
    built = {label: build_encoding(spec, n_heads=4, head_dim=16) for label, spec in specs.items()}
    assert {enc.name for enc in built.values()} >= set(list_encodings())
    # FoX and CABLE as published (the official gate init, bias 0); their open-gate variants say so.
    assert built["FoX"].gate_bias == 0 and built["CABLE"].gate_bias == 0
    variants = {label: enc.gate_bias for label, enc in built.items() if getattr(enc, "gate_bias", 0)}
    assert variants == {"FoX (gate bias 5 at init)": 5.0, "CABLE (bias -5 at init)": -5.0}
    # The page's paired differences are the papers' own comparisons, each method against its base.
    assert dict(get_study("length_generalisation").pairs) == {
        "DAPE-Kerple": "Kerple (log)",
        "DAPE-ALiBi": "ALiBi",
        "CoPE": "Relative",
    }


def test_pairs_name_two_rows_and_every_paper_number_says_whether_it_was_verified():
    with pytest.raises(ValueError, match="each pair must name two different rows"):
        tiny_lm_study(pairs=(("DAPE-Kerple", "ALiBi"),))
    with pytest.raises(ValueError, match="each pair must name two different rows"):
        tiny_lm_study(pairs=(("Kerple", "Kerple"),))
    with pytest.raises(ValueError, match="bars belong to a task table"):
        tiny_lm_study(bars=True)
    for study in STUDIES.values():
        if study.numbers or study.paper_numbers:
            assert study.numbers_check is not None, study.name
    # Only the counting table was read in a primary copy (the authors' repository); the long-program
    # counting study sets its one-variable column beside ours.
    verified = {
        name for name, study in STUDIES.items() if study.numbers_check and study.numbers_check.verified
    }
    assert verified == {"cope_counting", "cope_counting_long"}
    counting, long = get_study("cope_counting"), get_study("cope_counting_long")
    # The paper's relative table covers the whole block, so its number stands beside the uncapped row.
    renamed = {"Relative": "Relative, whole context"}
    assert {row: values["1var_256/id"] for row, values in long.numbers.items()} == {
        renamed.get(row, row): values["1var/id"] for row, values in counting.numbers.items()
    }
    specs = dict(long.rows)
    block = get_preset(long.parts[0].preset).override(list(long.parts[0].overrides)).model.max_len
    assert build_encoding(specs["Relative, whole context"], n_heads=4, head_dim=16).max_dist == block - 1
    assert build_encoding(specs["Relative, capped at 63"], n_heads=4, head_dim=16).max_dist == 63


def test_cope_length_generalisation_has_cope_at_the_papers_npos_max_and_at_its_ratio():
    study = get_study("cope_length_generalisation")
    train_len = get_preset(study.parts[0].preset).task.train_len
    assert NPOS_AT_PAPER_RATIO == 64 * train_len // 1024 == 8
    specs = dict(study.rows)
    assert specs["CoPE, npos_max 64 (the paper's)"] == "cope"
    assert build_encoding(specs["CoPE, npos_max 8 (the paper's ratio)"], n_heads=4, head_dim=32).npos_max == 8
    assert build_encoding("cope", n_heads=4, head_dim=32).npos_max == 64


def test_cope_at_512_keeps_the_papers_ratio_of_clamp_to_context():
    study = get_study("cope_length_generalisation_512")
    config = get_preset(study.parts[0].preset).override(list(study.parts[0].overrides))
    train_len = config.task.train_len
    assert train_len == 512 and study.aligned and study.scored_lengths(train_len) == [512, 1280]
    (_, relative), (_, cope) = study.rows
    assert (
        relative == "relative" and cope == f"cope[npos_max={64 * train_len // 1024}]" == "cope[npos_max=32]"
    )
    assert config.task.options["corpus"] == "python_docs"
