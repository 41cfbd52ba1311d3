"""Results as data: the finished runs of a study (or of any folder of runs) in one append-only file.

A folder ``OUT`` of runs (a study's ``OUT/<part>/<encoding>/seed<k>``, a ``poslab compare`` grid's
``OUT/<encoding>/seed<k>``) keeps what its pages are built from in two files beside them:

    OUT/data.jsonl        one JSON record per line, appended and never rewritten
    OUT/curves.jsonl.gz   the training curves: one line per run, one gzip member per append

A **run** record (``"kind": "run"``) is one finished run folder: ``run``, its path below ``OUT``
(``stdlib/rope/seed0``; the key: a folder is recorded once, the first record of a key is the one
read), ``part`` (the path above ``<encoding>/seed<k>``; a study's part), ``encoding``, ``seed``,
``commit`` and ``machine`` (cpu, isa, threads, torch: copies from results.json, to read at a
glance), ``config`` (its config.json) and ``results`` (its results.json). A **scoring** record
(``"kind": "scoring"``) is an LM-extrapolation part's scoring, ``part`` and ``result`` (the part's
results.json: settings, every run's perplexity per length, summary); a part scored again gets a new
record and the runner picks the one that matches its settings. A curves line holds ``run`` and
``files``: each ``*.jsonl`` of the folder (``metrics.jsonl``: the training loss and evaluations) as a
list of its records.

`StudyData.record_runs` appends the finished folders not recorded yet, under a lock on the file,
curves first, each file flushed to disk (fsync) before the next, so a crash leaves at most a partial
last line (or gzip member). Readers ignore such a partial last line with a warning; the next append
cuts it off and records its run again from its folder. Any other line that is not a record stops
the reader with a ValueError naming the file and the line. Pages read finished runs through
`RecordedRunDir`, a `RunDir` whose results and config come from its record, so a page built from
the data file needs no run folder: the folders, checkpoints and logs can be deleted once recorded.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from poslab.lab.checkpoint import json_safe, output_error
from poslab.lab.config import RunConfig
from poslab.lab.rundir import CONFIG, RESULTS, REUSABLE_CHANGES, RunDir, RunDirError, check_results

try:  # the lock that keeps two writers of one data file apart (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

log = logging.getLogger("poslab")

DATA = "data.jsonl"
CURVES = "curves.jsonl.gz"
RUN, SCORING = "run", "scoring"
_REQUIRED = {RUN: ("run", "config", "results"), SCORING: ("part", "result")}


def _line(record: dict[str, Any]) -> bytes:
    """One record as a line of strict JSON (NaN and infinities as null, as every results.json)."""
    return (json.dumps(json_safe(record), separators=(",", ":"), allow_nan=False) + "\n").encode()


def _canonical(value: Any) -> str:
    """A text that is equal for equal JSON values (NaN included, key order aside)."""
    return json.dumps(json_safe(value), sort_keys=True)


def same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same once written as JSON (NaN equal to None, key order aside)."""
    return _canonical(a) == _canonical(b)


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every record of a data file ([] when there is none). A last line
    without its newline (a write cut short) is left out with a warning; any other line that is not
    a record is a ValueError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    lines = text.split(b"\n")
    if lines[-1]:
        log.warning(
            "%s:%d is a partial line (a write cut short); ignored: its run is recorded again from its "
            "folder at the next page build",
            path,
            len(lines),
        )
    records = []
    for number, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            reason = getattr(error, "msg", None) or "not UTF-8"
            raise ValueError(f"{path}:{number} is not a record of a data file ({reason})") from None
        _check_record(record, f"{path}:{number}")
        records.append((number, record))
    return records


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict) or record.get("kind") not in _REQUIRED:
        kind = record.get("kind") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where} is not a record of a data file (kind {kind!r}, not 'run' or 'scoring')")
    missing = [key for key in _REQUIRED[record["kind"]] if key not in record]
    if missing:
        raise ValueError(f"{where} is not a {record['kind']} record (no {', '.join(map(repr, missing))})")
    if record["kind"] == RUN:
        if not isinstance(record["run"], str) or not isinstance(record["config"], dict):
            raise ValueError(f"{where} is not a run record ('run' or 'config' is not what it should be)")
        check_results(record["results"], where)


@dataclass(frozen=True)
class RecordedRunDir(RunDir):
    """A run folder as a data file records it: finished when there is a record, with the record's
    results and config, whether the folder is still there or not. Without a record, an unfinished
    run (whatever the folder holds: a page is built from the data file alone)."""

    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    where: str = field(default="", compare=False, repr=False)  # 'data.jsonl:12', for errors

    def status(self) -> str:
        return "finished" if self.record is not None else "empty"

    def is_finished(self) -> bool:
        return self.record is not None

    def load_results(self) -> dict[str, Any]:
        if self.record is None:
            raise ValueError(f"{self.path} is not recorded: it holds no finished run")
        return self.record["results"]

    def load_config(self) -> RunConfig:
        if self.record is None:
            raise ValueError(f"{self.path} is not recorded: it holds no finished run")
        try:
            return RunConfig.from_dict(self.record["config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.where}: {self.path} has no poslab run config: {error}") from None


class StudyData:
    """The data file of the folder ``folder`` (``folder/data.jsonl``, read once when made; none is
    an empty one) and the curves beside it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / DATA
        self.curves_path = self.folder / CURVES
        self.runs: dict[str, dict[str, Any]] = {}  # run key -> record (the first of its key)
        self.lines: dict[str, int] = {}  # run key -> its line
        self.scorings: dict[str, list[dict[str, Any]]] = {}  # part -> its scorings' results, in order
        for number, record in read_records(self.path):
            self._add(number, record)

    def _add(self, number: int, record: dict[str, Any]) -> None:
        if record["kind"] == RUN:
            if record["run"] not in self.runs:
                self.runs[record["run"]] = record
                self.lines[record["run"]] = number
        else:
            self.scorings.setdefault(record["part"], []).append(record["result"])

    # -- reading -----------------------------------------------------------------------------------

    def key(self, path: str | Path) -> str:
        """The key of the run folder ``path`` (below this data file's folder): ``part/enc/seed0``."""
        try:
            return Path(path).relative_to(self.folder).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not below {self.folder}, the folder of {self.path}") from None

    def get(self, path: str | Path) -> dict[str, Any] | None:
        """The record of the run folder ``path``, None when it is not recorded."""
        return self.runs.get(self.key(path))

    def where(self, path: str | Path) -> str:
        """'folder/data.jsonl:LINE' of a recorded run, for messages."""
        return f"{self.path}:{self.lines.get(self.key(path), '?')}"

    def run_dir(self, path: str | Path) -> RecordedRunDir:
        """The run at ``path`` as the data file has it (`RecordedRunDir`)."""
        record = self.get(path)
        return RecordedRunDir(Path(path), record, self.where(path) if record is not None else "")

    def check_reusable(self, path: str | Path, config: RunConfig) -> None:
        """`RunDirError` naming the data file, the run and the keys when ``path`` is recorded with a
        config other than ``config`` (beyond `REUSABLE_CHANGES`: `RunDir.check_reusable` of a
        recorded run), since a study would reuse it as it is. Nothing for a run not recorded."""
        record = self.get(path)
        if record is None:
            return
        saved = self.run_dir(path).load_config()
        changed = [k for k in config.diff(saved) if k not in REUSABLE_CHANGES]
        if changed:
            raise RunDirError(
                f"{self.where(path)} records {self.key(path)} with a different config "
                f"({', '.join(changed)}), which would be reused as it is; use another --out, or delete "
                "its line to train it again"
            )

    def curves(self) -> dict[str, dict[str, list[Any]]]:
        """run key -> {file name: its records} from the curves file (the first line of a run)."""
        curves: dict[str, dict[str, list[Any]]] = {}
        for number, line in enumerate(_read_gzip_lines(self.curves_path), start=1):
            try:
                record = json.loads(line)
                curves.setdefault(record["run"], record["files"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.curves_path}: line {number} is not a run's curves") from None
        return curves

    # -- writing -----------------------------------------------------------------------------------

    def record_runs(self, folders: Iterable[str | Path]) -> list[str]:
        """Append every finished run folder below ``folders`` (below this data file's folder) that
        is not recorded yet, with its curves; returns the keys appended. A folder whose run is
        recorded is left alone: a warning says so when its results differ from the record's."""
        found = [run for folder in folders for run in finished_folders(folder)]
        new = []
        for run in found:
            record = self.get(run)
            if record is None:
                new.append(run)
            elif _canonical(RunDir(run).load_results()) != _canonical(record["results"]):
                log.warning(
                    "%s differs from its record (%s); the record is kept (delete its line to record the "
                    "folder instead)",
                    run,
                    self.where(run),
                )
        if not new:
            return []
        with self._locked():
            self._reread()  # another process may have appended since this one read
            made = [run_record(self.folder, RunDir(run)) for run in new if self.get(run) is None]
            if made:
                _append(self.curves_path, b"".join(_gzip(_line(curve)) for _, curve in made), gzipped=True)
                _append(self.path, b"".join(_line(record) for record, _ in made))
            self._reread()
        keys = [record["run"] for record, _ in made]
        if keys:
            log.info("recorded %d finished run(s) in %s", len(keys), self.path)
        return keys

    def record_scoring(self, part: str, result: dict[str, Any]) -> dict[str, Any]:
        """The scoring ``result`` of LM part ``part`` as the data file holds it (strict JSON, without
        the list of files written), appended unless an equal one is recorded for the part."""
        stored = json.loads(json.dumps(json_safe({k: v for k, v in result.items() if k != "files"})))
        text = _canonical(stored)
        with self._locked():
            self._reread()
            if not any(_canonical(old) == text for old in self.scorings.get(part, [])):
                _append(self.path, _line({"kind": SCORING, "part": part, "result": stored}))
                self._reread()
        return next(old for old in self.scorings[part] if _canonical(old) == text)

    def _reread(self) -> None:
        self.runs, self.lines, self.scorings = {}, {}, {}
        for number, record in read_records(self.path):
            self._add(number, record)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the data file (created, empty, when missing)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "ab")  # noqa: SIM115 - held for the lock's lifetime
        except OSError as error:
            raise output_error(self.path, error) from None
        with handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def finished_folders(folder: str | Path) -> list[Path]:
    """The finished run folders at or below ``folder`` (none where it does not exist), sorted; not
    those behind a dot-name (an overwritten run's ``.replaced``)."""
    folder = Path(folder)
    if RunDir(folder).is_finished():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(
        p.parent
        for p in folder.rglob(RESULTS)
        if RunDir(p.parent).is_finished()
        and not any(part.startswith(".") for part in p.parent.relative_to(folder).parts)
    )


def run_record(root: Path, run_dir: RunDir) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run record and the curves line of the finished run folder ``run_dir`` below ``root``."""
    key = run_dir.path.relative_to(root).as_posix()
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {run_dir / CONFIG}: {error}") from None
    results = run_dir.load_results()
    label = results.get("encoding")
    if label is None:
        label = run_dir.load_config().encoding_label
    machine = dict(results.get("machine") or {})
    record = {
        "kind": RUN,
        "run": key,
        "part": "/".join(PurePosixPath(key).parts[:-2]),
        "encoding": label,
        "seed": results.get("seed", (config.get("train") or {}).get("seed")),
        "commit": machine.pop("commit", None),
        "machine": machine,
        "config": config,
        "results": results,
    }
    files = {path.name: _jsonl(path) for path in sorted(run_dir.path.glob("*.jsonl"))}
    return record, {"run": key, "files": files}


def _jsonl(path: Path) -> list[Any]:
    """The records of a run's ``*.jsonl`` file; a line that is not JSON is kept as its text."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(line)
    return out


# -- appending -------------------------------------------------------------------------------------


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # no time stamp: the same lines give the same bytes


def _append(path: Path, data: bytes, *, gzipped: bool = False) -> None:
    """Append ``data`` to ``path`` (created when missing) and flush it to disk; a partial last line
    (or gzip member) that a crash left is cut off first, with a warning."""
    try:
        with open(path, "a+b") as handle:
            handle.seek(0)
            content = handle.read()
            whole = _whole_members(content) if gzipped else content.rfind(b"\n") + 1
            if whole < len(content):
                log.warning("%s ends in a partial %s (a write cut short); cut off", path,
                            "gzip member" if gzipped else "line")  # fmt: skip
                handle.truncate(whole)
            handle.seek(0, os.SEEK_END)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise output_error(path, error) from None


def _whole_members(data: bytes) -> int:
    """The length of the whole gzip members at the start of ``data``."""
    end = 0
    while end < len(data):
        inflate = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            inflate.decompress(data[end:])
        except zlib.error:
            break
        if not inflate.eof:
            break
        end = len(data) - len(inflate.unused_data)
    return end


def _read_gzip_lines(path: Path) -> list[str]:
    """The lines of a curves file, member by member; a partial last member is left out with a
    warning, anything else that is not gzip is a ValueError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    whole = _whole_members(data)
    if whole < len(data):
        try:
            zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(data[whole:])
        except zlib.error:
            raise ValueError(f"{path} is not a gzip file from byte {whole} on") from None
        log.warning("%s ends in a partial gzip member (a write cut short); ignored", path)
    return gzip.decompress(data[:whole]).decode().splitlines() if whole else []


# -- the runs below a path, for pages of runs ------------------------------------------------------


def recorded_below(path: str | Path) -> list[tuple[Path, RecordedRunDir]]:
    """The recorded runs at or below ``path``, from the nearest data file at ``path`` or above it:
    (the run's folder, as it was below the data file's folder; its `RecordedRunDir`), sorted."""
    path = Path(path)
    for folder in (path, *path.parents):
        if (folder / DATA).is_file():
            data = StudyData(folder)
            found = [folder / key for key in data.runs]
            return [
                (run, data.run_dir(run)) for run in sorted(r for r in found if r == path or path in r.parents)
            ]
    return []
