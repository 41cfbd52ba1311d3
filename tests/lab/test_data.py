"""Tests of poslab.lab.data: corpora and their split by document, the R lazy-load databases of the
austen corpus, tokenizers, LM batches, evaluation windows and the streaming perplexity."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import math
import random
import struct
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from poslab.lab.data import (
    ByteTokenizer,
    Corpus,
    CorpusUnavailable,
    Document,
    build_lm_data,
    build_tokenizer,
    corpora,
    encode_documents,
    eval_windows,
    list_corpora,
    load_corpus,
    load_tokenizer,
    perplexity,
    sample_windows,
    split_documents,
    split_of,
    token_stream,
)

FIXTURES = Path(__file__).parents[1] / "data" / "rdata"


# -- split by document -----------------------------------------------------------------------------


def test_split_is_the_documented_hash_of_the_id() -> None:
    for doc_id in ["os.py", "asyncio/events.py", "emma", "büch/ü.txt"]:
        u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
        expected = "train" if u < 0.9 else "validation" if u < 0.95 else "test"
        assert split_of(doc_id) == expected
    # A salt gives another, independent split.
    ids = [f"doc{i}" for i in range(200)]
    assert [split_of(i) for i in ids] != [split_of(i, salt="other") for i in ids]


def test_split_is_independent_of_order_and_of_other_documents() -> None:
    docs = [Document(f"dir{i % 7}/file{i}.txt", f"text {i}") for i in range(300)]
    parts = split_documents(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert split_documents(shuffled) == parts
    # Removing half the corpus moves none of the remaining documents.
    fewer = split_documents(docs[::2])
    for split, members in fewer.items():
        assert set(d.id for d in members) <= set(d.id for d in parts[split])


def test_split_proportions() -> None:
    docs = [Document(f"doc-{i}", "x") for i in range(20_000)]
    parts = split_documents(docs, (0.8, 0.15, 0.05))
    fractions = [len(parts[s]) / len(docs) for s in ("train", "validation", "test")]
    assert fractions == pytest.approx([0.8, 0.15, 0.05], abs=0.01)
    assert sum(len(p) for p in parts.values()) == len(docs)


@pytest.mark.parametrize("bad", [(0.9, 0.1), (0.5, 0.3, 0.3), (1.1, -0.1, 0.0)])
def test_split_fractions_are_validated(bad: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_of("x", bad)


def test_corpus_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Corpus("c", (Document("a", "1"), Document("a", "2")))


def test_registry_errors_name_the_choices() -> None:
    assert {"stdlib", "files", "python_docs", "austen", "hf"} <= set(list_corpora())
    with pytest.raises(ValueError, match="known corpora: .*stdlib"):
        load_corpus("wikitext")
    with pytest.raises(ValueError, match="accepted: .*include_tests"):
        load_corpus("stdlib", include_test=True)


# -- file-based corpora ----------------------------------------------------------------------------


def test_stdlib_corpus_is_the_library_without_tests() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty __init__.py files are dropped silently
        corpus = load_corpus("stdlib")
    ids = {d.id for d in corpus.documents}
    assert {"os.py", "json/decoder.py"} <= ids
    assert not any(part in ("test", "tests", "site-packages") for i in ids for part in i.split("/"))
    assert corpus.n_chars > 1_000_000
    parts = corpus.split()
    assert all(parts[s] for s in ("train", "validation", "test"))


def test_stdlib_exclusions_and_caps(tmp_path: Path) -> None:
    for name in ["a.py", "pkg/b.py", "pkg/__init__.py", "test/t.py", "pkg/tests/t.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("" if name.endswith("__init__.py") else f"# {name}\n" * 50)
    (tmp_path / "site-packages" / "x").mkdir(parents=True)
    (tmp_path / "site-packages" / "x" / "c.py").write_text("x = 1\n")
    ids = [d.id for d in load_corpus("stdlib", path=str(tmp_path)).documents]
    assert ids == ["a.py", "pkg/b.py"]
    ids = [d.id for d in load_corpus("stdlib", path=str(tmp_path), include_tests=True).documents]
    assert ids == ["a.py", "pkg/b.py", "pkg/tests/t.py", "test/t.py"]
    capped = load_corpus("stdlib", path=str(tmp_path), include_tests=True, max_docs=2)
    assert len(capped) == 2
    assert capped == load_corpus("stdlib", path=str(tmp_path), include_tests=True, max_docs=2)
    one_file = len((tmp_path / "a.py").read_bytes())
    assert len(load_corpus("stdlib", path=str(tmp_path), max_bytes=one_file + 1)) == 1
    with pytest.raises(ValueError, match="max_docs"):
        load_corpus("stdlib", path=str(tmp_path), max_docs=0)


def _write_mixed_dir(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "good.txt").write_text("Hello, world.\n")
    (root / "sub" / "good2.md").write_text("# Titel\n\nÜberall ünïcödé.\n", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"  \n\n")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "notes.txt.gz").write_bytes(gzip.compress(b"compressed notes\n"))
    (root / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08garbage")
    (root / ".git" / "config").write_text("[core]\n")


def test_files_corpus_skips_bad_files_with_one_counting_warning(tmp_path: Path) -> None:
    _write_mixed_dir(tmp_path)
    with pytest.warns(UserWarning) as record:
        corpus = load_corpus("files", path=str(tmp_path))
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 5 of 8 files" in message
    for part in ["1 binary", "1 corrupt", "2 empty", "1 not UTF-8"]:
        assert part in message
    assert [d.id for d in corpus.documents] == ["good.txt", "notes.txt.gz", "sub/good2.md"]
    assert corpus.documents[2].text == "# Titel\n\nÜberall ünïcödé.\n"
    assert corpus.documents[1].text == "compressed notes\n"
    # Hidden files on request; a pattern; a single file; a glob.
    hidden = load_corpus("files", path=str(tmp_path), pattern="config", include_hidden=True)
    assert [d.id for d in hidden.documents] == [".git/config"]
    assert len(load_corpus("files", path=str(tmp_path), pattern="*.md")) == 1
    single = load_corpus("files", path=str(tmp_path / "good.txt"))
    assert [d.id for d in single.documents] == ["good.txt"]
    globbed = load_corpus("files", path=str(tmp_path / "**" / "*.md"))
    assert [d.id for d in globbed.documents] == ["sub/good2.md"]


def test_files_corpus_with_nothing_usable_raises(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"no usable text file.*1 empty, 1 not UTF-8"):
        load_corpus("files", path=str(tmp_path))
    with pytest.raises(ValueError, match="neither a directory, a file nor a glob"):
        load_corpus("files", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no file matches"):
        load_corpus("files", path=str(tmp_path), pattern="*.rst")


PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")


@pytest.mark.skipif(not PYTHON_DOCS.is_dir(), reason="Debian package python3.11-doc is not installed")
def test_python_docs_corpus() -> None:
    corpus = load_corpus("python_docs")
    ids = {d.id for d in corpus.documents}
    assert len(corpus) > 400
    assert {"library/os.rst", "tutorial/index.rst"} <= ids
    assert ".. module:: os" in next(d.text for d in corpus.documents if d.id == "library/os.rst")


def test_python_docs_absent_names_the_debian_package(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpora, "_python_docs_roots", lambda: [tmp_path / "none"])
    with pytest.raises(CorpusUnavailable, match=r"apt-get install python3\.11-doc"):
        load_corpus("python_docs")
    # Given a directory, it reads it (and gz-compressed pages too).
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.rst.txt").write_text("os\n==\n")
    (tmp_path / "index.rst.txt.gz").write_bytes(gzip.compress(b"Index\n"))
    corpus = load_corpus("python_docs", path=str(tmp_path))
    assert [d.id for d in corpus.documents] == ["index.rst", "library/os.rst"]


@pytest.mark.skipif(not AUSTEN.is_file(), reason="Debian package r-cran-janeaustenr is not installed")
def test_austen_corpus() -> None:
    pytest.importorskip("rdata", reason="the austen extra (rdata) is not installed")
    books = load_corpus("austen")
    assert [d.id for d in books.documents] == [
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    ]
    emma = books.documents[0].text
    assert emma.startswith("EMMA\n\nBy Jane Austen\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in emma
    assert len(emma) == 866_793 + 16_235  # R: sum(nchar(emma)) + one newline per line
    chapters = load_corpus("austen", unit="chapter")
    assert len(chapters) == 269  # R: lines matching "^(CHAPTER|Chapter) " per book, summed
    assert chapters.n_chars == pytest.approx(books.n_chars, rel=1e-3)
    emma_chapters = [d for d in chapters.documents if d.id.startswith("emma/")]
    assert emma_chapters[0].text.startswith("EMMA")
    assert emma_chapters[18].text.startswith("VOLUME II\n")  # a volume heading opens a chapter
    assert all(d.text.strip() for d in chapters.documents)


def test_austen_absent_names_the_debian_package(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpora, "AUSTEN_ROOTS", (str(tmp_path / "janeaustenr"),))
    with pytest.raises(CorpusUnavailable, match=r"apt-get install r-cran-janeaustenr"):
        load_corpus("austen")
    with pytest.raises(ValueError, match="unit"):
        load_corpus("austen", unit="paragraph")


def test_austen_from_a_hand_built_package(tmp_path: Path) -> None:
    pytest.importorskip("rdata", reason="the austen extra (rdata) is not installed")
    lines = ["BOOK", "", "CHAPTER I", "", "One.", "", "VOLUME II", "", "CHAPTER II", "Two.", None]
    _write_lazy_load_db(
        tmp_path / "pkg" / "data" / "Rdata",
        {"book": strsxp(lines), "n": intsxp([1])},
        compression=1,
    )
    corpus = load_corpus("austen", path=str(tmp_path / "pkg"))
    assert [d.id for d in corpus.documents] == ["book"]
    assert corpus.documents[0].text == "\n".join(x or "" for x in lines) + "\n"
    chapters = load_corpus("austen", path=str(tmp_path / "pkg"), unit="chapter")
    assert [d.text for d in chapters.documents] == [
        "BOOK\n\nCHAPTER I\n\nOne.\n",
        "VOLUME II\n\nCHAPTER II\nTwo.\n",
    ]


def test_hf_corpus_from_local_files(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    rows = {"text": ["first doc", "", "third doc"], "key": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows.*1 empty"):
        corpus = load_corpus("hf", path=str(tmp_path / "saved"), id_field="key")
    assert [(d.id, d.text) for d in corpus.documents] == [("a", "first doc"), ("c", "third doc")]
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(5)))
    cache = str(tmp_path / "cache")
    corpus = load_corpus(
        "hf", path="json", data_files=str(lines), text_field="body", max_docs=3, cache_dir=cache
    )
    assert [d.text for d in corpus.documents] == ["row 0", "row 1", "row 2"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus("hf", path="json", data_files=str(lines), cache_dir=cache)


def test_hf_corpus_without_datasets_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'poslab\[hf\]'"):
        load_corpus("hf", path="anything")


# -- R lazy-load databases, serialized by hand following R Internals section 1.8 ------------------


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def flags(sexptype: int, *, levels: int = 0, attr: bool = False, tag: bool = False) -> bytes:
    return _i(sexptype | attr << 9 | tag << 10 | levels << 12)


NIL = _i(254)
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6


def charsxp(s: str | None, levels: int | None = None) -> bytes:
    if s is None:
        return flags(9) + _i(-1)
    if levels is None:
        levels = ASCII if s.isascii() else UTF8
    raw = s.encode("latin-1" if levels == LATIN1 else "utf-8")
    return flags(9, levels=levels) + _i(len(raw)) + raw


def strsxp(values: list, attr: bytes = b"") -> bytes:
    body = b"".join(charsxp(v) if not isinstance(v, bytes) else v for v in values)
    return flags(16, attr=bool(attr)) + _i(len(values)) + body + attr


def intsxp(values: list, attr: bytes = b"") -> bytes:
    ints = [-(2**31) if v is None else v for v in values]
    return flags(13, attr=bool(attr)) + _i(len(ints)) + struct.pack(f">{len(ints)}i", *ints) + attr


NA_REAL = struct.pack(">II", 0x7FF00000, 1954)


def vecsxp(items: list[bytes], attr: bytes = b"") -> bytes:
    return flags(19, attr=bool(attr)) + _i(len(items)) + b"".join(items) + attr


def symbol(name: str) -> bytes:
    return flags(1) + charsxp(name)


def ref(index: int) -> bytes:
    return _i(index << 8 | 255)


def pairlist(items: list[tuple[bytes | None, bytes]], tail: bytes = NIL) -> bytes:
    cells = b"".join(flags(2, tag=tag is not None) + (tag or b"") + value for tag, value in items)
    return cells + tail


def header(version: int = 3) -> bytes:
    head = b"X\n" + _i(version) + _i(0x040202) + _i(0x020300)
    return head + (_i(5) + b"UTF-8" if version == 3 else b"")


def _write_lazy_load_db(base: Path, objects: dict[str, bytes], *, compression: int) -> None:
    """NAME.rdb records and the NAME.rdx index, as R's makeLazyLoadDB writes them."""
    base.parent.mkdir(parents=True, exist_ok=True)
    rdb, offsets = b"", []
    for body in objects.values():
        data = header() + body
        if compression == 1:
            record = struct.pack(">I", len(data)) + zlib.compress(data)
        elif compression == 2:
            record = struct.pack(">I", len(data)) + b"2" + bz2.compress(data)
        else:
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
            raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
            record = struct.pack(">I", len(data)) + b"Z" + raw
        offsets.append(intsxp([len(rdb), len(record)]))
        rdb += record
    names = pairlist([(symbol("names"), strsxp(list(objects)))])
    index = vecsxp(
        [vecsxp(offsets, attr=names), vecsxp([]), intsxp([compression])],
        attr=pairlist([(ref(1), strsxp(["variables", "references", "compressed"]))]),
    )
    base.with_name(base.name + ".rdb").write_bytes(rdb)
    base.with_name(base.name + ".rdx").write_bytes(gzip.compress(header() + index))


@pytest.mark.parametrize("compression", [1, 2, 3])
def test_lazy_load_db_by_hand(tmp_path: Path, compression: int) -> None:
    pytest.importorskip("rdata", reason="the austen extra (rdata) is not installed")
    _write_lazy_load_db(
        tmp_path / "Rdata", {"words": strsxp(["x", None]), "n": intsxp([3, 1])}, compression=compression
    )
    db = corpora._lazy_load_db(tmp_path / "Rdata")
    assert list(db) == ["words", "n"]
    assert db["words"].tolist() == ["x", None] and db["n"].tolist() == [3, 1]
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:-3])
    with pytest.raises(ValueError, match="object 'n' is unreadable"):
        corpora._lazy_load_db(tmp_path / "Rdata")


def test_lazy_load_dbs_written_by_r() -> None:
    """Fixtures written by R 4.2.2 (tests/data/rdata/make_fixtures.R), zlib and xz records."""
    pytest.importorskip("rdata", reason="the austen extra (rdata) is not installed")
    for db_name in ["db_zlib", "db_xz"]:
        db = corpora._lazy_load_db(FIXTURES / db_name)
        assert db["letters3"].tolist() == ["a", "b", "c"]
        assert db["squares"].tolist() == [1.0, 4.0, 9.0, 16.0]


def test_austen_without_rdata_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    _write_lazy_load_db(tmp_path / "pkg" / "data" / "Rdata", {"book": strsxp(["x"])}, compression=1)
    monkeypatch.setitem(sys.modules, "rdata", None)  # import rdata raises ImportError
    with pytest.raises(CorpusUnavailable, match=r"pip install 'poslab\[austen\]'"):
        load_corpus("austen", path=str(tmp_path / "pkg"))


# -- tokenizers ------------------------------------------------------------------------------------

SAMPLES = ["", "plain ascii", "ünïcödé and emoji 🚀", "tabs\tand\r\nnewlines\n", "<eos> literal"]


def test_byte_tokenizer_round_trip_and_save(tmp_path: Path) -> None:
    tok = build_tokenizer("bytes")
    assert tok.vocab_size == 257 and tok.eos_id == 256
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)  # special tokens are never parsed from text
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256, 33]) == "hi<eos>!"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a cut character
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([257])
    plain = ByteTokenizer(special_tokens=())
    assert plain.vocab_size == 256 and plain.eos_id is None
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.special_tokens == ("<eos>",)


def test_tokenizer_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known tokenizers: bytes, bpe"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="accepted: special_tokens"):
        build_tokenizer("bytes", vocab_size=300)
    with pytest.raises(ValueError, match="no tokenizer saved"):
        load_tokenizer(tmp_path)


def test_bpe_train_save_load_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="the bpe extra (tokenizers) is not installed")
    texts = [f"def function_{i}(x):\n    return x * {i} + offset\n" for i in range(200)]
    tok = build_tokenizer("bpe", texts=texts, vocab_size=320)
    assert 257 < tok.vocab_size <= 320 and tok.eos_id is not None
    unseen = "class Ünseen:  # 🚀\n\tpass\r\n" + "".join(SAMPLES)
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: any text round-trips
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # merges were learned
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.name == "bpe" and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(unseen) == tok.encode(unseen) and loaded.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="texts="):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="at least 256"):
        build_tokenizer("bpe", texts=texts, vocab_size=100)


def test_lm_data_trains_bpe_on_train_split_and_reuses_the_run_dir(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="the bpe extra (tokenizers) is not installed")
    docs = tuple(Document(f"d{i}", f"document number {i} " * 20) for i in range(60))
    corpus = Corpus("toy", docs)
    first = build_lm_data(corpus, tokenizer="bpe", vocab_size=300, run_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = build_lm_data(corpus, tokenizer="bpe", vocab_size=999, run_dir=tmp_path)
    assert again.vocab_size == first.vocab_size  # loaded, not retrained
    assert torch.equal(again.streams["validation"], first.streams["validation"])
    with pytest.raises(ValueError, match="holds a 'bpe' tokenizer"):
        build_lm_data(corpus, tokenizer="bytes", run_dir=tmp_path)


def test_token_cache_is_reused_only_for_the_same_content(monkeypatch, tmp_path: Path) -> None:
    docs = tuple(Document(f"d{i}", f"text {i} " * 10) for i in range(40))
    first = build_lm_data(Corpus("toy", docs), run_dir=tmp_path, cache_tokens=True)
    assert (tmp_path / "tokens.pt").is_file()

    def no_encoding(*args: object) -> None:
        raise AssertionError("the cached tokens should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(token_stream, "encode_documents", no_encoding)
        cached = build_lm_data(Corpus("toy", docs), run_dir=tmp_path, cache_tokens=True)
    for split in first.streams:
        assert torch.equal(cached.streams[split], first.streams[split])
    changed = (*docs[:-1], Document(docs[-1].id, "new text"))
    fresh = build_lm_data(Corpus("toy", changed), run_dir=tmp_path, cache_tokens=True)
    assert fresh.summary() != first.summary()
    with pytest.raises(ValueError, match="needs a run_dir"):
        build_lm_data(Corpus("toy", docs), cache_tokens=True)


# -- LM batches and evaluation windows -------------------------------------------------------------


def test_stream_joins_documents_with_eos() -> None:
    tok = ByteTokenizer()
    stream = encode_documents(tok, [Document("a", "hi"), Document("b", "yo")])
    assert stream.tolist() == [104, 105, 256, 121, 111, 256]
    data = build_lm_data(Corpus("toy", (Document("a", "hi"),)), fractions=(1.0, 0.0, 0.0))
    assert data.summary()["train"] == {"documents": 1, "tokens": 3}
    with pytest.raises(ValueError, match="validation split of corpus 'toy' is empty"):
        data.eval_windows(2)


def test_training_windows_are_slices_of_the_stream() -> None:
    stream = torch.arange(1000, dtype=torch.int32)
    inputs, targets = sample_windows(stream, 16, 50, generator=torch.Generator().manual_seed(3))
    assert inputs.shape == targets.shape == (16, 50) and inputs.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(inputs, inputs[:, :1] + torch.arange(50))  # contiguous in the stream
    assert int(targets.max()) <= 999
    again, _ = sample_windows(stream, 16, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(inputs, again)
    with pytest.raises(ValueError, match="does not fit"):
        sample_windows(stream, 1, 1000, generator=torch.Generator())


def test_eval_windows_are_non_overlapping_and_cover_the_stream() -> None:
    stream = torch.arange(107)
    windows = eval_windows(stream, 9)  # T = 9: windows of 10 tokens
    assert windows.shape == (10, 10)
    assert torch.equal(windows.flatten(), stream[:100])  # in order, no overlap, tail dropped
    capped = eval_windows(stream, 9, max_windows=4)
    starts = (capped[:, 0] // 10).tolist()
    assert starts == [0, 3, 6, 9]  # evenly spaced over the stream
    assert torch.equal(capped, windows[starts])
    assert torch.equal(eval_windows(stream, 9, max_windows=50), windows)
    with pytest.raises(ValueError, match="shorter than one evaluation window"):
        eval_windows(stream, 200)


# -- perplexity ------------------------------------------------------------------------------------


def test_perplexity_of_uniform_logits_is_the_vocab_size() -> None:
    windows = torch.randint(0, 50, (5, 301))
    result = perplexity(lambda x: torch.zeros(*x.shape, 50), windows, batch_size=2)
    assert result.last == pytest.approx(50, rel=1e-6) and result.all == pytest.approx(50, rel=1e-6)
    assert (result.n_tokens_last, result.n_tokens_all, result.n_last) == (5 * 256, 5 * 300, 256)


def test_perplexity_of_a_fixed_distribution_by_hand() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    windows = torch.tensor([[0, 0, 1, 2, 3], [3, 1, 1, 0, 0]])  # targets: 0 1 2 3 / 1 1 0 0
    result = perplexity(lambda x: probs.log().expand(*x.shape, 4), windows, last=2)
    # all targets: -log p = 1, 2, 3, 3, 2, 2, 1, 1 bits; the last two of each window: 3, 3, 1, 1
    assert result.all == pytest.approx(2 ** (15 / 8))
    assert result.last == pytest.approx(2 ** (8 / 4))
    assert result.nll_all == pytest.approx(15 / 8 * math.log(2))


def test_perplexity_selects_the_last_tokens_and_equals_a_naive_loop() -> None:
    torch.manual_seed(1)
    vocab, length = 7, 12
    table = torch.randn(vocab, length, vocab)

    def model_fn(x: torch.Tensor) -> torch.Tensor:  # logits depend on the token and its position
        return table[x, torch.arange(x.shape[1])]  # (B, T, V)

    windows = torch.randint(0, vocab, (5, length + 1))
    nll = []
    for w in windows:
        logp = torch.log_softmax(model_fn(w[None, :-1])[0].double(), dim=-1)
        nll.append([-logp[t, w[t + 1]].item() for t in range(length)])
    nll = torch.tensor(nll, dtype=torch.float64)
    for last in [1, 5, 12, 256]:
        result = perplexity(model_fn, windows, last=last, batch_size=2)
        expected_last = nll[:, length - min(last, length) :].mean().exp().item()
        assert result.last == pytest.approx(expected_last, rel=1e-5)
        assert result.all == pytest.approx(nll.mean().exp().item(), rel=1e-5)
    with pytest.raises(ValueError, match="logits"):
        perplexity(lambda x: torch.zeros(x.shape[0], vocab), windows)


def test_stdlib_bytes_lm_data_end_to_end() -> None:
    data = build_lm_data(load_corpus("stdlib", max_docs=60), tokenizer="bytes")
    summary = data.summary()
    assert sum(s["documents"] for s in summary.values()) == 60
    inputs, targets = data.sample(4, 64, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == (4, 64) and int(inputs.max()) < data.vocab_size
    windows = data.eval_windows(128, split="train", max_windows=3)
    uniform = perplexity(lambda x: torch.zeros(*x.shape, data.vocab_size), windows)
    assert uniform.all == pytest.approx(data.vocab_size, rel=1e-6)
