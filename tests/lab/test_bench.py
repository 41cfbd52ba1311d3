"""The benchmark module runs end to end at tiny sizes (its numbers are not asserted: it is no test
of speed), reports ratios against the baseline of the same run, and writes JSON atomically."""

from __future__ import annotations

import json

import pytest
import torch

import poslab
from poslab.kernels import native
from poslab.lab import bench
from poslab.model import ModelConfig, build_model


def test_attention_table_has_ratios_against_sdpa():
    table = bench.bench_attention(
        batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["alibi", "cope"]
    )
    rows = {r["attention"]: r for r in table.rows}
    other_cope = {"cope (PyTorch)", "cope (C++ forced)"} & set(rows)  # where the C++ kernel is built
    assert len(other_cope) == native.cope_supports(torch.zeros(1))
    assert set(rows) - other_cope == {"sdpa (causal)", "plain materialised", "alibi", "cope", "cope (eager)"}
    assert rows["sdpa (causal)"]["fwd+bwd / sdpa"] == 1.0
    for r in table.rows:
        assert r["fwd+bwd / sdpa"] == pytest.approx(r["fwd+bwd ms"] / rows["sdpa (causal)"]["fwd+bwd ms"])
    assert "| cope (eager) |" in table.markdown()


@pytest.mark.skipif(not native.available(), reason="the native DAPE kernel is not built here")
def test_native_dape_rows_come_with_their_pytorch_counterpart(monkeypatch):
    """Both DAPE paths are timed in the same run, so the kernel's gain is a same-run ratio; each row
    says which path it took, and the table which CPU and build it ran on."""
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    table = bench.bench_attention(
        batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["dape", "dape[kernel_size=3]"]
    )
    paths = {r["attention"]: r["path"] for r in table.rows}
    level = native.arch()
    assert paths["dape"] == paths["dape[kernel_size=3]"] == f"C++ {level}"
    assert paths["dape (PyTorch MLP)"] == "PyTorch MLP"
    assert paths["dape (eager)"] == paths["dape[kernel_size=3] (eager)"] == "eager"
    assert table.settings["native_kernel"].startswith(level)
    assert table.settings["cpu"] == native.cpu_model() and table.settings["allocator_tuned"] in (True, False)
    assert f"| dape | C++ {level} |" in table.markdown()
    step = bench.bench_train_step(
        d_model=16, layers=1, heads=2, batch=1, length=16, repeats=1, encodings=["dape"]
    )
    assert [r["encoding"] for r in step.rows] == ["rope", "dape", "dape (PyTorch MLP)"]
    assert [r["path"] for r in step.rows] == ["auto", f"C++ {level}", "PyTorch MLP"]


@pytest.mark.skipif(
    not native.cope_supports(torch.zeros(1)), reason="the native CoPE kernel is not built here"
)
def test_native_cope_rows_come_with_their_pytorch_counterpart(monkeypatch):
    """CoPE's C++ and PyTorch paths are timed side by side too, each row naming its path; when the
    guard declines the kernel, it is the forced row."""
    level = native.arch()
    monkeypatch.setenv("POSLAB_NATIVE", "1")
    table = bench.bench_attention(batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["cope+rope"])
    paths = {r["attention"]: r["path"] for r in table.rows}
    assert paths["cope+rope"] == f"C++ {level}" and paths["cope+rope (PyTorch)"] == "PyTorch"
    step = bench.bench_train_step(
        d_model=16, layers=1, heads=2, batch=1, length=16, repeats=1, encodings=["cope"]
    )
    assert [(r["encoding"], r["path"]) for r in step.rows] == [
        ("rope", "auto"),
        ("cope", f"C++ {level}"),
        ("cope (PyTorch)", "PyTorch"),
    ]
    monkeypatch.delenv("POSLAB_NATIVE")
    monkeypatch.setattr(native, "decision", lambda *args: False)
    table = bench.bench_attention(batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["cope"])
    paths = {r["attention"]: r["path"] for r in table.rows}
    assert paths["cope"] == "PyTorch" and paths["cope (C++ forced)"] == f"C++ {level}"


@pytest.mark.skipif(not native.available(), reason="the native DAPE kernel is not built here")
def test_when_the_guard_declines_the_kernel_it_is_timed_as_the_forced_row(monkeypatch):
    monkeypatch.delenv("POSLAB_NATIVE", raising=False)
    monkeypatch.setattr(native, "decision", lambda *args: False)
    table = bench.bench_attention(batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["dape"])
    paths = {r["attention"]: r["path"] for r in table.rows}
    assert paths == {
        "sdpa (causal)": "sdpa",
        "plain materialised": "eager",
        "dape": "PyTorch MLP",
        "dape (C++ forced)": f"C++ {native.arch()}",
        "dape (eager)": "eager",
    }


def test_train_step_table_is_relative_to_rope():
    table = bench.bench_train_step(
        d_model=16, layers=1, heads=2, batch=1, length=16, repeats=1, encodings=["cope"]
    )
    rows = {r["encoding"]: r for r in table.rows}
    assert rows["rope"]["step / rope"] == 1.0 and "cope" in rows


def test_decode_reports_identical_outputs():
    table = bench.bench_decode(
        n_new=4, cases=((1, 3), (3, 5)), d_model=16, layers=1, heads=2, encodings=["cope", "alibi"]
    )
    assert [(r["encoding"], r["batch"], r["prompt"]) for r in table.rows] == [
        ("cope", 1, 3),
        ("cope", 3, 5),
        ("alibi", 1, 3),
        ("alibi", 3, 5),
    ]
    assert all(r["identical"] is True for r in table.rows)


def test_hand_written_nope_step_matches_the_model():
    """The bench's floor row must generate the very tokens the model does, or it is no floor."""
    table = bench.bench_decode(n_new=6, cases=((2, 5),), d_model=16, layers=2, heads=2, encodings=["nope"])
    rows = {r["encoding"]: r for r in table.rows}
    assert set(rows) == {"nope", "nope, hand-written step"}
    assert all(r["identical"] is True for r in table.rows)
    model = build_model(ModelConfig(vocab_size=8, d_model=8, n_heads=2, encoding="rope"))
    with pytest.raises(ValueError, match="NoPE"):
        bench.lean_nope_generate(model, torch.zeros(1, 2, dtype=torch.long), 1)


def test_memory_runs_each_encoding_in_its_own_process():
    table = bench.bench_memory(length=64, layers=1, d_model=16, heads=2, encodings=["rope", "nosuch"])
    good, bad = table.rows
    assert good["finite"] is True and good["peak MB"] > 0
    assert bad["peak MB"] == "failed" and "unknown encoding" in bad["added MB"]


def test_run_bench_writes_json_and_rejects_unknown_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_decode", lambda **kw: bench.Table("t", ["a"], [{"a": 1}]))
    out = tmp_path / "bench.json"
    said = []
    tables = bench.run_bench(["decode"], out=out, progress=said.append)
    assert json.loads(out.read_text())[0]["rows"] == [{"a": 1}] and len(tables) == 1
    assert said[0] == "bench: section 1/1, decode ..."  # announced before its minutes of timing


def test_run_bench_on_a_full_disk_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    from poslab.lab import checkpoint

    monkeypatch.setattr(bench, "bench_decode", lambda **kw: bench.Table("t", ["a"], [{"a": 1}]))
    out = tmp_path / "bench.json"
    out.write_text("old")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_bytes", full)
    with pytest.raises(checkpoint.OutputError, match="No space left on device"):
        bench.run_bench(["decode"], out=out, progress=lambda s: None)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["bench.json"]
    with pytest.raises(ValueError, match="unknown bench section\\(s\\) speed"):
        bench.run_bench(["speed"])


def test_cli_bench_quick_section_writes_json(tmp_path, capsys):
    from poslab.lab.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--sections", "decode", "--quick", "--out", str(out)]) == 0
    assert "Decoding with the KV cache" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["rows"]
    assert main(["bench", "--sections", "speed", "--out", str(out)]) == 2


def test_compile_table_times_compiled_against_eager_side_by_side():
    """Each encoding's attention and training step, eager and compiled, with the ratio of the two and
    the first (compiling) call apart; aot_eager here, as inductor would build C++ for minutes."""
    table = bench.bench_compile(
        batch=1, heads=2, length=16, head_dim=8, d_model=16, layers=1, repeats=1,
        encodings=["alibi", "cope"], backend="aot_eager",
    )  # fmt: skip
    assert [(r["encoding"], r["what"]) for r in table.rows] == [
        ("alibi", "attention fwd+bwd"),
        ("alibi", "train step"),
        ("cope", "attention fwd+bwd"),
        ("cope", "train step"),
    ]
    for row in table.rows:
        assert row["first call s"] > 0 and row["eager ms"] > 0, row
        assert row["compiled / eager"] == pytest.approx(row["compiled ms"] / row["eager ms"])
    assert table.settings["backend"] == "aot_eager" and "aot_eager" in table.title
    assert bench.DEFAULT_SECTIONS == ("attention", "step", "decode", "memory")


def test_a_compile_failure_is_a_row_not_an_error(monkeypatch):
    def refuse(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler\nmore")

        return compiled

    monkeypatch.setattr(torch, "compile", refuse)
    table = bench.bench_compile(
        batch=1, heads=2, length=8, head_dim=8, d_model=16, layers=1, repeats=1, encodings=["rope"]
    )
    assert [r["compiled ms"] for r in table.rows] == ["failed: RuntimeError: no compiler"] * 2


def test_cli_compile_flag_adds_the_compile_section(tmp_path, capsys, monkeypatch):
    from poslab.lab.cli import main

    asked = []
    for section in ("decode", "compile"):
        table = bench.Table(section, ["a"], [{"a": 1}])
        monkeypatch.setattr(bench, f"bench_{section}", lambda table=table, **kw: asked.append(kw) or table)
    out = tmp_path / "b.json"
    assert main(["bench", "--sections", "decode", "--compile", "--quick", "--out", str(out)]) == 0
    assert [t["title"] for t in json.loads(out.read_text())] == ["decode", "compile"]
    assert asked[1] == {"device": "cpu", "length": 128, "repeats": 3}  # --quick: small shapes
    assert "section 2/2, compile" in capsys.readouterr().out


@pytest.mark.parametrize("sections", [",", " , ,", ""])
def test_bench_with_no_section_keeps_the_old_file(capsys, tmp_path, sections):
    """``--sections ,`` used to measure nothing and write ``[]`` over the last bench.json."""
    from poslab.lab.cli import main

    out = tmp_path / "bench.json"
    out.write_text('[{"old": 1}]')
    code = main(["bench", "--sections", sections, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no bench section" in err, err
    assert out.read_text() == '[{"old": 1}]'


def test_every_registered_encoding_is_in_the_memory_table_and_the_newer_ones_everywhere():
    assert set(poslab.list_encodings()) <= set(bench.MEMORY_ENCODINGS)
    for table in (bench.ATTENTION_ENCODINGS, bench.STEP_ENCODINGS, bench.DECODE_ENCODINGS):
        assert set(bench.NEWER) <= set(table)


def test_attention_bench_gives_encodings_that_read_the_layer_input_their_keys():
    table = bench.bench_attention(
        batch=1, heads=2, length=16, head_dim=8, repeats=1, encodings=["fox", "selective"]
    )
    names = [row["attention"] for row in table.rows]
    assert {"fox", "fox (eager)", "selective", "selective (eager)"} <= set(names)
    assert all(row["fwd+bwd ms"] > 0 for row in table.rows)
