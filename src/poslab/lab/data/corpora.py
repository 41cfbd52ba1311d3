"""Text corpora read from local files, split into train / validation / test by document.

A corpus is a list of `Document` (a stable id and its text). Every source reads files that are
already on the machine; nothing is downloaded at run time except by the optional "hf" source.

    corpus = load_corpus("stdlib")                 # the running Python's standard library
    parts = corpus.split()                         # {"train": [...], "validation": [...], ...}

Sources (docs/tasks.md, language modelling):
- "stdlib": the .py files of the running Python's standard library (code; on every machine).
- "files": a directory, a file or a glob of text files (``path=``).
- "python_docs": the reST sources of the Python documentation from Debian's python3.11-doc.
- "austen": Jane Austen's six novels from Debian's r-cran-janeaustenr (an R lazy-load database, read
  with the ``rdata`` package: the ``austen`` extra).
- "hf": a Hugging Face ``datasets`` dataset (the ``hf`` extra), local or downloaded.

The split is a pure function of a document's id: sha256(salt + id) mapped to [0, 1) picks the split
by the cumulative fractions. So a document stays in its split across runs, machines, document
orders and corpus sizes (adding files never moves the others).

Files that cannot be used (empty, binary, not UTF-8, unreadable) are skipped with one warning that
counts them by reason; a ValueError is raised when nothing usable remains.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import lzma
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poslab.registry import Registry

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)


class CorpusUnavailable(ValueError):
    """The files of a corpus are not on this machine (the message says what to install)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    id: a stable identifier (a path relative to the corpus root, a book name); the split hashes it.
    text: the document's text.
    """

    id: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named list of documents with unique ids, sorted by id.

    name: the source's registry name. source: where it was read from (a path or a dataset name).
    """

    name: str
    documents: tuple[Document, ...]
    source: str = ""

    def __post_init__(self) -> None:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise ValueError(f"corpus {self.name!r} has duplicate document ids: {duplicates[:5]}")

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    def split(
        self, fractions: Sequence[float] = DEFAULT_FRACTIONS, *, salt: str = ""
    ) -> dict[str, list[Document]]:
        """The documents of each split ("train", "validation", "test"); see `split_of`."""
        return split_documents(self.documents, fractions, salt=salt)


def _unit_interval(key: str) -> float:
    """sha256 of ``key`` as a number in [0, 1): stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as a (train, validation, test) triple; ValueError unless >= 0 and sum to 1."""
    values = tuple(fractions)
    if len(values) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in values):
        raise ValueError(
            f"split fractions must be three non-negative numbers (train, validation, test), got {fractions!r}"
        )
    if abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    return values  # type: ignore[return-value]


def split_of(doc_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, *, salt: str = "") -> str:
    """The split ("train", "validation" or "test") of the document with id ``doc_id``.

    u = sha256(salt + doc_id) in [0, 1); train if u < f_train, validation if u < f_train + f_val,
    else test. A different ``salt`` gives an independent split.
    """
    train, validation, _ = check_fractions(fractions)
    u = _unit_interval(salt + doc_id)
    if u < train:
        return "train"
    return "validation" if u < train + validation else "test"


def split_documents(
    documents: Iterable[Document], fractions: Sequence[float] = DEFAULT_FRACTIONS, *, salt: str = ""
) -> dict[str, list[Document]]:
    """Documents grouped by `split_of` their id, each group sorted by id (order-independent)."""
    check_fractions(fractions)
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in sorted(documents, key=lambda d: d.id):
        parts[split_of(doc.id, fractions, salt=salt)].append(doc)
    return parts


# -- registry --------------------------------------------------------------------------------------

CORPORA: Registry[Callable[..., Corpus]] = Registry("corpus", "corpora")


def register(name: str) -> Callable[[Callable[..., Corpus]], Callable[..., Corpus]]:
    """Decorator adding a corpus loader (keyword-only options, returns a `Corpus`)."""

    def wrap(loader: Callable[..., Corpus]) -> Callable[..., Corpus]:
        return CORPORA.add(name, loader)

    return wrap


def list_corpora() -> list[str]:
    """Names of all registered corpora."""
    return CORPORA.names()


def load_corpus(name: str, **options: Any) -> Corpus:
    """Load the corpus registered as ``name`` with its keyword ``options``."""
    return CORPORA.build(name, **options)


# -- reading files ---------------------------------------------------------------------------------


def _check_caps(max_docs: int | None, max_bytes: int | None) -> None:
    for key, value in (("max_docs", max_docs), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None, got {value!r}")


def _decode(raw: bytes, *, gzipped: bool) -> tuple[str | None, str]:
    """(text, "") for a usable file, else (None, the reason it is skipped)."""
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return None, "corrupt"
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    return text.removeprefix("\ufeff"), ""


def read_text_files(
    files: Sequence[tuple[str, Path]],
    *,
    corpus: str,
    source: str,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    warn_empty: bool = True,
) -> tuple[Document, ...]:
    """Documents from (id, path) pairs, skipping unusable files with one counting warning.

    Files named ``*.gz`` are decompressed. With ``warn_empty=False`` empty files are dropped
    without being counted in the warning (a package tree's empty ``__init__.py`` are normal).
    With ``max_docs`` / ``max_bytes`` the files are read in a fixed pseudo-random order (a hash of
    the id, independent of the split's hash) until one more document would pass a cap, so a
    capped corpus is a stable sample spread over the whole tree.
    """
    _check_caps(max_docs, max_bytes)
    capped = max_docs is not None or max_bytes is not None
    order = sorted(files, key=lambda f: _unit_interval("sample:" + f[0])) if capped else files
    docs: list[Document] = []
    skipped: Counter[str] = Counter()
    n_bytes = 0
    for doc_id, path in order:
        if max_docs is not None and len(docs) >= max_docs:
            break
        try:
            raw = path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        if max_bytes is not None and docs and n_bytes + len(raw) > max_bytes:
            break
        text, reason = _decode(raw, gzipped=path.suffix == ".gz")
        if text is None:
            if reason != "empty" or warn_empty:
                skipped[reason] += 1
            continue
        docs.append(Document(doc_id, text))
        n_bytes += len(raw)
    n_tried = len(docs) + sum(skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    if not docs:
        raise ValueError(
            f"corpus {corpus!r}: no usable text file in {source} "
            f"({n_tried} file(s) tried{': ' + reasons if reasons else ''})"
        )
    if skipped:
        warnings.warn(
            f"corpus {corpus!r}: skipped {sum(skipped.values())} of {n_tried} files in {source}: {reasons}",
            stacklevel=3,
        )
    return tuple(sorted(docs, key=lambda d: d.id))


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of a glob pattern without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


# -- sources ---------------------------------------------------------------------------------------


@register("stdlib")
def stdlib(
    *,
    path: str | None = None,
    include_tests: bool = False,
    max_docs: int | None = None,
    max_bytes: int | None = None,
) -> Corpus:
    """The running Python's standard library: every ``.py`` file under ``sysconfig``'s stdlib path.

    One document per file, id = its path relative to the stdlib root (``asyncio/events.py``).
    Left out: site-packages / dist-packages (third-party code) and, unless ``include_tests``, every
    directory named test, tests or idle_test (CPython's test suite is larger than the library and
    holds deliberately malformed files). Empty files (package ``__init__.py``) are dropped without
    a warning. path: another library root (tests use a small one).
    """
    root = Path(path) if path is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusUnavailable(f"corpus 'stdlib': {root} is not a directory")
    excluded_dirs = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        excluded_dirs |= {"test", "tests", "idle_test"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in excluded_dirs]  # prune, not filter
        for file_name in names:
            if file_name.endswith(".py"):
                file = Path(folder, file_name)
                files.append((file.relative_to(root).as_posix(), file))
    files.sort()
    docs = read_text_files(
        files,
        corpus="stdlib",
        source=str(root),
        max_docs=max_docs,
        max_bytes=max_bytes,
        warn_empty=False,
    )
    return Corpus("stdlib", docs, str(root))


@register("files")
def files(
    *,
    path: str | os.PathLike[str],
    pattern: str = "*",
    include_hidden: bool = False,
    max_docs: int | None = None,
    max_bytes: int | None = None,
) -> Corpus:
    """Text files the user names: a directory (searched recursively), one file, or a glob.

    path: a directory, a file, or a glob such as ``"src/**/*.py"`` (``**`` spans directories).
    pattern: for a directory, which file names to take (e.g. ``"*.txt"``; every file by default).
    include_hidden: also take files under names starting with "." (``.git`` and the like).
    Document ids are paths relative to the directory (for a glob, its leading fixed directory).
    """
    path = os.fspath(path)
    target = Path(path)
    if target.is_dir():
        root = target
        candidates = [p for p in root.rglob(pattern) if p.is_file()]
    elif target.is_file():
        root, candidates = target.parent, [target]
    elif glob.has_magic(path):
        root = _glob_root(path)
        candidates = [Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file()]
    else:
        raise ValueError(f"corpus 'files': {path!r} is neither a directory, a file nor a glob")
    chosen = []
    for file in candidates:
        relative = file.relative_to(root)
        if include_hidden or not _is_hidden(relative):
            chosen.append((relative.as_posix(), file))
    if not chosen:
        raise ValueError(f"corpus 'files': no file matches {path!r} (pattern {pattern!r})")
    chosen.sort()
    docs = read_text_files(chosen, corpus="files", source=path, max_docs=max_docs, max_bytes=max_bytes)
    return Corpus("files", docs, path)


PYTHON_DOCS_PACKAGE = "python3.11-doc"


def _python_docs_roots() -> list[Path]:
    running = f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}"
    roots = [Path(running), Path("/usr/share/doc/python3.11")]
    roots += sorted(Path(p) for p in glob.glob("/usr/share/doc/python3.*"))
    return [r / "html" / "_sources" for r in dict.fromkeys(roots)]


@register("python_docs")
def python_docs(
    *, path: str | None = None, max_docs: int | None = None, max_bytes: int | None = None
) -> Corpus:
    """The reST sources of the Python documentation, as Debian's python3.11-doc installs them.

    Read from ``/usr/share/doc/python3.X/html/_sources/**/*.txt`` (the running Python's version
    first, then 3.11, then any other). One document per page, id = its path without the ``.txt``
    suffix (``library/os.rst``). path: another ``_sources`` directory.
    """
    roots = [Path(path)] if path is not None else _python_docs_roots()
    for root in roots:
        if root.is_dir():
            files = sorted(
                (f.relative_to(root).as_posix().removesuffix(".gz").removesuffix(".txt"), f)
                for f in root.rglob("*")
                if f.is_file() and f.name.endswith((".txt", ".txt.gz"))
            )
            if files:
                docs = read_text_files(
                    files,
                    corpus="python_docs",
                    source=str(root),
                    max_docs=max_docs,
                    max_bytes=max_bytes,
                )
                return Corpus("python_docs", docs, str(root))
    raise CorpusUnavailable(
        f"corpus 'python_docs': no reST sources under {', '.join(map(str, roots))}; install the "
        f"Debian package {PYTHON_DOCS_PACKAGE} (apt-get install {PYTHON_DOCS_PACKAGE}) or pass "
        f"path= to a directory of *.rst.txt files"
    )


AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_ROOTS = (
    "/usr/lib/R/site-library/janeaustenr",
    "/usr/local/lib/R/site-library/janeaustenr",
    "/usr/lib/R/library/janeaustenr",
)
AUSTEN_UNITS = ("book", "chapter")
# A chapter heading line: "CHAPTER XIV", "Chapter 3". A volume heading right before one joins it.
_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [IVXLC\d]+\.?$")
_VOLUME = re.compile(r"^VOLUME [IVXLC\d]+\.?$")


def _chapters(book: str, lines: list[str]) -> list[Document]:
    starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line.strip())]
    for k, start in enumerate(starts):
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and _VOLUME.match(lines[j].strip()):
            starts[k] = j
    starts = [0] + starts[1:] if starts else [0]  # the title page opens the first chapter
    ends = starts[1:] + [len(lines)]
    return [
        Document(f"{book}/{k + 1:03d}", "\n".join(lines[a:b]).strip("\n") + "\n")
        for k, (a, b) in enumerate(zip(starts, ends, strict=True))
    ]


# A lazy-load record compressed with xz (R's compress = 3) is a raw LZMA2 stream, xz's preset 6.
_R_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def _lazy_load_db(base: Path) -> dict[str, Any]:
    """The objects of an R lazy-load database (``base``.rdx, ``base``.rdb), converted by the ``rdata``
    package: the .rdx index is an RDS file (names -> byte offset and length in the .rdb); each .rdb
    record is its uncompressed length (4 bytes, big-endian), then a zlib stream (``compressed`` 1, as
    R packages' data), or a type byte and a bzip2 ('2'), raw xz ('Z') or uncompressed ('0') body
    (2 and 3). Environments stored by reference are not resolved (data holds plain vectors)."""
    import rdata  # the austen extra; the caller turns ImportError into CorpusUnavailable

    def parse(data: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))

    index = parse(base.with_name(base.name + ".rdx").read_bytes())
    compression = int(index.get("compressed", [1])[0])
    rdb = base.with_name(base.name + ".rdb").read_bytes()
    objects: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset) : int(offset) + int(length)]
        kind, body = (record[4:5], record[5:]) if compression in (2, 3) else (b"1", record[4:])
        try:
            if compression == 0 or kind == b"0":
                data = record if compression == 0 else bytes(body)
            elif kind == b"1":
                data = zlib.decompress(body)
            elif kind == b"2":
                data = bz2.decompress(body)
            elif kind == b"Z":
                data = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_R_LZMA_FILTERS)
            else:
                raise ValueError(f"unknown record compression {kind!r}")
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
            raise ValueError(f"{base}.rdb: object {str(name)!r} is unreadable ({err})") from None
        objects[str(name)] = parse(data)
    return objects


@register("austen")
def austen(*, path: str | None = None, unit: str = "book") -> Corpus:
    """Jane Austen's six published novels from Debian's r-cran-janeaustenr R package.

    The package stores each novel as a character vector (one line of text per element) in an R
    lazy-load database (``data/Rdata.rdb``/``.rdx``), read here without R by the ``rdata`` package
    (``pip install 'poslab[austen]'``).
    unit: "book" (one document per novel, id e.g. "emma") or "chapter" (id "emma/001", ...; a
    volume heading goes with the chapter that follows it). With six books, the default 90/5/5 split
    by book leaves validation empty; use unit="chapter" (~270 documents) or split fractions such as
    (0.6, 0.2, 0.2) (four books for training, one each for validation and test).
    path: the package directory (the one holding ``data/``).
    """
    if unit not in AUSTEN_UNITS:
        raise ValueError(f"corpus 'austen': unit must be one of {AUSTEN_UNITS}, got {unit!r}")
    roots = [Path(path)] if path is not None else [Path(p) for p in AUSTEN_ROOTS]
    found = [r for r in roots if (r / "data" / "Rdata.rdx").is_file()]
    if not found:
        raise CorpusUnavailable(
            f"corpus 'austen': no janeaustenr data under {', '.join(map(str, roots))}; install the "
            f"Debian package {AUSTEN_PACKAGE} (apt-get install {AUSTEN_PACKAGE}) or pass path= to "
            f"the R package directory"
        )
    try:
        objects = _lazy_load_db(found[0] / "data" / "Rdata")
    except ImportError:
        raise CorpusUnavailable(
            "corpus 'austen' reads R data with the rdata package: pip install 'poslab[austen]'"
        ) from None
    docs: list[Document] = []
    for book, value in objects.items():
        if not (hasattr(value, "dtype") and value.dtype.kind in "UO"):  # a character vector
            continue
        lines = ["" if line is None else str(line) for line in value.tolist()]
        if unit == "book":
            docs.append(Document(book, "\n".join(lines) + "\n"))
        else:
            docs.extend(_chapters(book, lines))
    if not docs:
        raise ValueError(f"corpus 'austen': {found[0]}/data/Rdata.rdb holds no character vectors")
    return Corpus("austen", tuple(sorted(docs, key=lambda d: d.id)), str(found[0]))


@register("hf")
def hf(
    *,
    path: str,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    id_field: str | None = None,
    data_files: str | list[str] | None = None,
    cache_dir: str | None = None,
    max_docs: int | None = None,
) -> Corpus:
    """A Hugging Face ``datasets`` dataset (needs the ``hf`` extra: pip install 'poslab[hf]').

    path: a dataset on the Hub (downloaded and cached by ``datasets``), a builder such as "json" or
    "text" with ``data_files``, or a directory written by ``Dataset.save_to_disk``. name: the
    dataset's configuration. split: which of the dataset's splits to read; poslab then splits its
    rows by document id like any corpus. text_field: the column holding the text. id_field: a
    column of unique ids (default: ``"{split}/{row index}"``). cache_dir: where ``datasets`` keeps
    its downloads and Arrow files (its default cache otherwise). max_docs: read the first rows only.
    Rows whose text is empty or not a string are skipped with one counting warning.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "corpus 'hf' needs the Hugging Face datasets library: pip install 'poslab[hf]'"
        ) from err
    _check_caps(max_docs, None)
    local = Path(path)
    if local.is_dir() and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"corpus 'hf': {path} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(path, name, split=split, data_files=data_files, cache_dir=cache_dir)
    for field_name in (text_field, id_field):
        if field_name is not None and field_name not in loaded.column_names:
            raise ValueError(
                f"corpus 'hf': {path} has no column {field_name!r}; columns: {loaded.column_names}"
            )
    if max_docs is not None:
        loaded = loaded.select(range(min(max_docs, len(loaded))))
    columns = [text_field] + ([id_field] if id_field else [])
    docs, skipped = [], Counter()
    for index, row in enumerate(loaded.select_columns(columns)):
        text = row[text_field]
        if not isinstance(text, str):
            skipped["not text"] += 1
        elif not text.strip():
            skipped["empty"] += 1
        else:
            doc_id = str(row[id_field]) if id_field else f"{split}/{index:09d}"
            docs.append(Document(doc_id, text))
    source = f"{path} ({name or 'default'}, {split})"
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    if not docs:
        raise ValueError(f"corpus 'hf': no usable text in {source}{': ' + reasons if reasons else ''}")
    if skipped:
        warnings.warn(
            f"corpus 'hf': skipped {sum(skipped.values())} of {len(loaded)} rows in {source}: {reasons}",
            stacklevel=2,
        )
    return Corpus("hf", tuple(sorted(docs, key=lambda d: d.id)), source)
