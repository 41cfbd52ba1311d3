"""The LM task and the length-extrapolation evaluation (DAPE protocol) on a tiny corpus."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_corpus
from poslab.lab.experiments.extrapolation import (
    aligned_windows,
    doubling_lengths,
    extrapolate,
    find_run_dirs,
    load_run,
    run_experiment,
)
from poslab.lab.experiments.extrapolation_page import markdown_tables, write_extrapolation_report
from poslab.lab.parsing import parse_lengths
from poslab.lab.presets import get_preset
from poslab.lab.tasks import build_task
from poslab.lab.train import train


def task_options(corpus: Path) -> dict:
    return {"corpus": "files", "corpus_options": {"path": str(corpus)}, "fractions": [0.6, 0.2, 0.2]}


def tiny_lm(corpus: Path, encoding: str, seed: int = 0):
    """lm_stdlib_small shrunk to a second: 2 layers d 32, 16 tokens, 4 steps."""
    return get_preset("lm_stdlib_small").override(
        {
            "model.d_model": 32,
            "model.n_layers": 2,
            "model.n_heads": 2,
            "model.max_len": 16,
            "model.encoding": encoding,
            "task.train_len": 16,
            "task.options": task_options(corpus),
            "train.steps": 4,
            "train.batch_size": 4,
            "train.warmup": 1,
            "train.checkpoint_every": 0,
            "train.log_every": 2,
            "train.device": "cpu",
            "train.seed": seed,
            "eval.batches": 1,
            "eval.batch_size": 4,
        }
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three tiny trained runs: RoPE (seeds 0 and 1), learned absolute (max_len 16), DAPE-Kerple."""
    root = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(root / "corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dirs = {}
    for name, encoding, seed in [
        ("rope0", "rope", 0),
        ("rope1", "rope", 1),
        ("learned", "learned", 0),
        ("dape", "dape[base=kerple_log]", 0),
    ]:
        dirs[name] = root / "runs" / name
        train(tiny_lm(corpus, encoding, seed), dirs[name], progress=False)
    torch.set_num_threads(threads)
    return {"root": root, "corpus": corpus, "dirs": dirs}


# -- the lm task -----------------------------------------------------------------------------------


def test_lm_task_windows(tmp_path):
    task = build_task("lm", **task_options(write_corpus(tmp_path / "c")))
    assert task.causal and task.vocab_size == 257 and task.n_outputs == 257
    batch = task.sample(5, 24, generator=torch.Generator().manual_seed(3), **task.splits()["id"])
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (5, 24)
    assert batch.mask.all() and batch.inputs.dtype == torch.long
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets = inputs shifted by one
    again = task.sample(5, 24, generator=torch.Generator().manual_seed(3), split="train")
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    other = task.sample(5, 24, generator=torch.Generator().manual_seed(4), split="train")
    assert not torch.equal(batch.inputs, other.inputs)
    # Each row is a contiguous piece of the training stream.
    stream = task.data.stream("train").long()
    row = torch.cat((batch.inputs[0], batch.targets[0, -1:]))
    starts = (stream.unfold(0, 25, 1) == row).all(dim=1).nonzero()
    assert starts.numel() >= 1
    # The held-out splits read other documents.
    assert set(task.splits()) == {"id", "validation", "test"}
    held = task.sample(2, 24, generator=torch.Generator().manual_seed(3), **task.splits()["validation"])
    assert held.inputs.shape == (2, 24)


def test_lm_task_metrics(tmp_path):
    task = build_task("lm", **task_options(write_corpus(tmp_path / "c")))
    batch = task.sample(3, 10, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(3, 10, 257)
    m = task.metrics(logits, batch)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).item()
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    wrong = (logits.argmax(-1) != batch.targets).float().mean().item() * 100
    assert m["error"] == pytest.approx(wrong)
    perfect = F.one_hot(batch.targets, 257).float() * 50
    assert task.metrics(perfect, batch)["error"] == 0.0


def test_lm_task_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        build_task("lm", corpus="nope")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_task("lm", tokenizer="words")
    with pytest.raises(ValueError, match="sum to 1"):
        build_task("lm", fractions="0.5,0.2,0.2")
    task = build_task("lm", **task_options(write_corpus(tmp_path / "c")))
    with pytest.raises(ValueError, match="unknown split"):
        task.sample(1, 4, generator=torch.Generator(), split="dev")


def test_lm_task_eval_lengths_score_the_held_out_splits_at_each_length(tmp_path):
    options = task_options(write_corpus(tmp_path / "c"))
    task = build_task("lm", **options, eval_lengths="40,16")
    assert task.split_lengths("validation") == task.split_lengths("test") == (16, 40)
    assert task.split_lengths("id") is None  # training keeps its one length
    assert task.data_key == build_task("lm", **options).data_key  # the same token streams
    batch = task.sample(2, 40, generator=torch.Generator().manual_seed(0), **task.splits()["validation"])
    assert batch.inputs.shape == (2, 40)
    with pytest.raises(ValueError, match=r"length 24 is not one of the split's lengths \[16, 40\]"):
        task.sample(2, 24, generator=torch.Generator(), **task.splits()["test"])
    assert build_task("lm", **options, eval_lengths=320).split_lengths("test") == (320,)
    for bad in ("0,16", "long", [16, True]):
        with pytest.raises(ValueError, match="eval_lengths must be positive integers such as 128,320"):
            build_task("lm", **options, eval_lengths=bad)


# -- extrapolation ---------------------------------------------------------------------------------


def test_extrapolate_matches_direct_perplexity(runs, tmp_path):
    dirs = runs["dirs"]
    result = extrapolate(
        [dirs["rope0"], dirs["rope1"]], lengths=[16, 32, 64], max_windows=3, last=8, device="cpu"
    )
    assert result["settings"]["windows"] == {"16": 3, "32": 3, "64": 3}
    run = load_run(dirs["rope0"])
    for length in (16, 32, 64):
        windows = run.task.data.eval_windows(length, split="validation", max_windows=3)
        with torch.no_grad():
            logits = run.model(windows[:, :-1])
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").double()
        got = result["runs"][0]["results"][str(length)]
        assert got["status"] == "ok" and got["n_windows"] == 3
        assert got["ppl_all"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
        assert got["ppl_last"] == pytest.approx(math.exp(nll[:, -8:].mean().item()), rel=1e-5)
    # The summary is the mean and sample std over the two seeds.
    values = [r["results"]["32"]["ppl_last"] for r in result["runs"]]
    stats = result["summary"]["rope"]["lengths"]["32"]["ppl_last"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(values) / 2)
    assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))


def test_report_files_and_learned_not_applicable(runs, tmp_path):
    dirs = runs["dirs"]
    result = extrapolate(
        [dirs["rope0"], dirs["learned"], dirs["dape"]], lengths=[16, 32], max_windows=2, device="cpu"
    )
    by_label = {r["encoding"]: r for r in result["runs"]}
    assert by_label["learned"]["results"]["16"]["status"] == "ok"
    learned_32 = by_label["learned"]["results"]["32"]
    assert learned_32["status"] == "n/a" and "ppl_last" not in learned_32
    assert "learned absolute" in learned_32["reason"]
    # Every run is scored on the same tokens.
    assert (
        len({r["results"]["32"].get("n_tokens_all") for r in result["runs"] if r["encoding"] != "learned"})
        == 1
    )
    files = write_extrapolation_report(result, tmp_path / "report")
    names = {p.name for p in files}
    assert {"table.md", "results.csv", "results.json"} <= names
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| learned | 1 |" in table and "n/a" in table and "dape[base=kerple_log]" in table
    rows = list(csv.DictReader(io_lines(tmp_path / "report" / "results.csv")))
    assert len(rows) == 3 * 2
    learned_row = next(r for r in rows if r["encoding"] == "learned" and r["length"] == "32")
    assert learned_row["status"] == "n/a" and learned_row["ppl_last"] == ""
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["summary"]["learned"]["lengths"]["32"]["status"] == "n/a"
    rope_row = next(r for r in rows if r["encoding"] == "rope" and r["length"] == "16")
    assert float(rope_row["ppl_last"]) == pytest.approx(by_label["rope"]["results"]["16"]["ppl_last"])
    pytest.importorskip("matplotlib")
    for name in ("ppl_last.png", "ppl_all.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def io_lines(path: Path):
    return path.read_text().splitlines()


def test_windows_are_the_same_for_every_encoding(runs):
    dirs = runs["dirs"]
    a, b = load_run(dirs["rope0"]), load_run(dirs["dape"])
    assert a.task.data_key == b.task.data_key
    for length in (16, 64):
        wa = a.task.data.eval_windows(length, max_windows=4)
        wb = b.task.data.eval_windows(length, max_windows=4)
        assert torch.equal(wa, wb)
    # Windows are non-overlapping pieces of the held-out stream.
    stream = a.task.data.stream("validation")
    all_windows = a.task.data.eval_windows(16)
    assert torch.equal(all_windows.flatten(), stream[: all_windows.numel()].long())


def test_aligned_windows_score_the_same_tokens_at_every_length(runs):
    stream = torch.arange(1000)
    windows = aligned_windows(stream, [16, 32, 64], 5)
    assert {n: tuple(w.shape) for n, w in windows.items()} == {16: (5, 17), 32: (5, 33), 64: (5, 65)}
    for n in (16, 32):  # shorter windows are suffixes of the longest: same scored tokens
        assert torch.equal(windows[n], windows[64][:, -(n + 1) :])
    starts, ends = windows[64][:, 0], windows[64][:, -1]
    assert (starts[1:] > ends[:-1]).all() and ends[-1] <= 999  # non-overlapping, inside the stream
    assert aligned_windows(stream, [400], 9)[400].shape[0] == 2  # capped at what fits
    result = extrapolate([runs["dirs"]["rope0"]], lengths=[16, 32], max_windows=3, aligned=True, last=8)
    assert result["settings"]["aligned"] and "aligned" in markdown_tables(result)
    scored = [result["runs"][0]["results"][n]["n_tokens_last"] for n in ("16", "32")]
    assert scored == [3 * 8, 3 * 8]


def test_default_lengths_and_discovery(runs):
    assert doubling_lengths(128, 4096) == [128, 256, 512, 1024, 2048, 4096]
    assert doubling_lengths(16, 40) == [16, 32]
    assert parse_lengths("64, 16,32,16") == [16, 32, 64]
    found = find_run_dirs([runs["root"] / "runs"])
    assert set(found) == set(runs["dirs"].values())
    result = extrapolate([runs["dirs"]["rope0"]], max_len=32, max_windows=1, device="cpu")
    assert result["settings"]["lengths"] == [16, 32]
    assert "| rope | 1 |" in markdown_tables(result)


def test_user_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="no such run directory"):
        extrapolate([tmp_path / "missing"], lengths=[16])
    with pytest.raises(ValueError, match="holds none"):
        extrapolate([tmp_path], lengths=[16])
    for bad in ("16,x", "0,16", ""):
        with pytest.raises(ValueError, match="lengths"):
            parse_lengths(bad)
    with pytest.raises(ValueError, match="do not fit"):
        extrapolate([runs["dirs"]["rope0"]], lengths=[10**7], device="cpu")
    with pytest.raises(ValueError, match="held-out split"):
        extrapolate([runs["dirs"]["rope0"]], lengths=[16], split="train")
    broken = tmp_path / "broken"
    shutil.copytree(runs["dirs"]["rope0"], broken)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt") as info:
        extrapolate([broken], lengths=[16])
    assert "\n" not in str(info.value) and "checkpoint.pt" in str(info.value)
    (broken / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match="no checkpoint"):
        load_run(broken)


def test_other_data_or_task_is_refused(runs, tmp_path):
    other = write_corpus(tmp_path / "other", n_docs=30)
    run_dir = tmp_path / "other_run"
    train(tiny_lm(other, "rope"), run_dir, progress=False)
    with pytest.raises(ValueError, match="different data"):
        extrapolate([runs["dirs"]["rope0"], run_dir], lengths=[16])
    smoke = tmp_path / "smoke"
    train(get_preset("smoke").override({"train.steps": 2, "train.device": "cpu"}), smoke, progress=False)
    with pytest.raises(ValueError, match="'flipflop' run"):
        load_run(smoke)


def test_lm_extrapolation_refuses_two_encodings_in_one_directory(tmp_path):
    with pytest.raises(ValueError, match="map to the same directory"):
        run_experiment("lm_stdlib_small", ["rope", "rope"], [0], tmp_path / "lm")
    assert not (tmp_path / "lm").exists()


def test_a_finished_runs_scores_are_kept_and_a_stopped_scoring_resumes(runs, tmp_path, monkeypatch, caplog):
    import poslab.lab.experiments.extrapolation as ex

    run_dir = tmp_path / "dape"
    shutil.copytree(runs["dirs"]["dape"], run_dir)
    (run_dir / "scores.json").unlink(missing_ok=True)
    calls = []
    real = ex.perplexity

    def counting(model, windows, **kw):
        calls.append(windows.shape[1] - 1)
        if len(calls) == 2 and stop_at_second:
            raise KeyboardInterrupt
        return real(model, windows, **kw)

    monkeypatch.setattr(ex, "perplexity", counting)
    # Stopped while scoring its second length: the first length's score is kept.
    stop_at_second = True
    with pytest.raises(KeyboardInterrupt):
        extrapolate([run_dir], lengths=[16, 32, 64], max_windows=2, last=8, device="cpu")
    kept = json.loads((run_dir / "scores.json").read_text())
    assert list(kept["results"]) == ["16"]
    # The rerun scores only what is missing, and gives what a fresh scoring gives.
    stop_at_second = False
    calls.clear()
    with caplog.at_level("INFO", logger="poslab"):
        resumed = extrapolate([run_dir], lengths=[16, 32, 64], max_windows=2, last=8, device="cpu")
    assert calls == [32, 64] and "at 16: scored earlier" in caplog.text
    fresh = extrapolate([runs["dirs"]["dape"]], lengths=[16, 32, 64], max_windows=2, last=8, device="cpu")
    for length in ("16", "32", "64"):
        got, want = resumed["runs"][0]["results"][length], fresh["runs"][0]["results"][length]
        assert got["ppl_last"] == want["ppl_last"] and got["ppl_all"] == want["ppl_all"]
    assert set(json.loads((run_dir / "scores.json").read_text())["results"]) == {"16", "32", "64"}
    # Anything the scores depend on changed: scored again (other scored tokens, windows, checkpoint).
    for options in ({"last": 4}, {"max_windows": 1}):
        calls.clear()
        extrapolate([run_dir], lengths=[16], device="cpu", **{"max_windows": 2, "last": 8, **options})
        assert calls == [16], options
    calls.clear()
    extrapolate([run_dir], lengths=[16], max_windows=1, last=8, device="cpu")  # the last settings: kept
    assert calls == []
    stat = (run_dir / "checkpoint.pt").stat()
    os.utime(run_dir / "checkpoint.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    extrapolate([run_dir], lengths=[16], max_windows=1, last=8, device="cpu")
    assert calls == [16]
    # A corrupt scores.json counts as none; an unfinished run keeps no scores.
    (run_dir / "scores.json").write_text("{not json")
    calls.clear()
    extrapolate([run_dir], lengths=[16], max_windows=1, device="cpu")
    assert calls == [16] and json.loads((run_dir / "scores.json").read_text())["results"]
    (run_dir / "scores.json").unlink()
    (run_dir / "results.json").unlink()
    extrapolate([run_dir], lengths=[16], max_windows=1, device="cpu")
    assert not (run_dir / "scores.json").exists()


def test_scores_that_cannot_be_kept_are_still_returned(runs, tmp_path, monkeypatch, caplog):
    import poslab.lab.experiments.extrapolation as ex
    from poslab.lab.checkpoint import OutputError

    run_dir = tmp_path / "rope"
    shutil.copytree(runs["dirs"]["rope0"], run_dir)
    (run_dir / "scores.json").unlink(missing_ok=True)

    def full_disk(path, text):
        raise OutputError(f"cannot write {path}: no space left on device")

    monkeypatch.setattr(ex, "write_text", full_disk)
    with caplog.at_level("WARNING", logger="poslab"):
        result = extrapolate([run_dir], lengths=[16, 32], max_windows=1, device="cpu")
    assert all(r["status"] == "ok" for r in result["runs"][0]["results"].values())
    assert caplog.text.count("scores are not kept") == 1 and "no space left" in caplog.text
    assert not (run_dir / "scores.json").exists()
