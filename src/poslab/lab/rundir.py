"""Run directories: the files a training run writes, its status, and loading what it holds.

A run lives in its own directory:

    config.json     the resolved `RunConfig`, written first
    metrics.jsonl   one JSON record per line: training loss every ``log_every`` steps, evaluations
    checkpoint.pt   the last checkpoint (see `poslab.lab.checkpoint`)
    train.log       the log lines of the run
    results.json    the final evaluation; its presence marks a finished run
    scores.json     extrapolation scores of the finished run (`poslab.lab.experiments.extrapolation`)
    .lock           the id of the process writing the run, while it does (`RunDir.lock`)

`RunDir` is the one place that knows these names. `poslab.lab.train` writes them, `poslab.lab.report` and
`poslab.lab.experiments` read them back; a checkpoint file alone also loads (`load_model`). A
finished run's config, results and curves are kept, once the folder is gone, in its study's data
file (`poslab.lab.report.datafile`, whose `RecordedRunDir` reads them as a `RunDir` would).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poslab.lab.checkpoint import (
    TMP_PREFIX,
    TMP_SUFFIX,
    CheckpointError,
    load_checkpoint,
    write_json,
    write_text,
)
from poslab.lab.config import RunConfig
from poslab.model import Transformer, build_model

CONFIG, METRICS, CHECKPOINT, RESULTS, LOG, SCORES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "results.json",
    "train.log",
    "scores.json",  # the run's extrapolation scores, kept so that a stopped scoring resumes
)
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, RESULTS, LOG, SCORES)
ASIDE = ".replaced"  # an overwritten run's files until the new run has a checkpoint
LOCK = ".lock"  # the id of the process writing the run, while it does (`RunDir.lock`)
# Keys in which a finished run may differ from a grid's request and still be reused as it is:
# where it trained, not what.
REUSABLE_CHANGES = ("train.device",)
# Keys a resumed run may change: they alter how long it runs, when it logs, where, and how it is
# evaluated, but not what a given step learns.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.device",
    "eval.",
)


def resumable_change(key: str) -> bool:
    """Whether a resumed run may differ from its saved config in dotted ``key``."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


class RunDirError(ValueError):
    """The output directory holds a run that would be overwritten."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_json(path: Path, missing: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(missing) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint: its config, task, model and the step it was saved at."""

    config: RunConfig
    task: Any  # a poslab.lab.tasks.Task
    model: Transformer
    step: int

    @property
    def label(self) -> str:
        return self.config.encoding_label

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def train_len(self) -> int:
        return int(self.config.task.train_len)


@dataclass(frozen=True)
class RunDir:
    """One run directory (it need not exist yet): its files, status and contents."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> str:
        """'empty' (no run files), 'finished' (results.json) or 'unfinished' (anything else)."""
        if (self / RESULTS).is_file():
            return "finished"
        if any((self / name).exists() for name in (CONFIG, METRICS, CHECKPOINT)):
            return "unfinished"
        return "empty"

    def is_finished(self) -> bool:
        """A run with its results (a report directory has results.json but no config.json)."""
        return (self / RESULTS).is_file() and (self / CONFIG).is_file()

    def has_checkpoint(self) -> bool:
        return (self / CHECKPOINT).exists()

    def check(
        self, *, resume: bool, overwrite: bool, config: RunConfig | None = None, read_only: bool = False
    ) -> str:
        """Raise `RunDirError` when the directory holds a run and neither flag allows touching it,
        or when resuming it with a ``config`` that differs from the saved one beyond
        `RESUMABLE_CHANGES`. Returns the directory's `status`. ``read_only``: the caller only reads
        the directory (a page built while a grid trains), so another process's lock is no error."""
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a directory")
        if not read_only:
            self.check_unlocked()
        status = self.status()
        if status != "empty" and not (resume or overwrite):
            raise RunDirError(
                f"{self.path} already holds {'an' if status[0] in 'aeiou' else 'a'} {status} run; "
                "pass --resume to continue it or "
                "--overwrite to replace it"
            )
        if resume and config is not None and (self / CONFIG).exists():
            changed = [k for k in config.diff(self.load_config()) if not resumable_change(k)]
            if changed:
                raise RunDirError(
                    f"{self.path} holds a run with a different config ({', '.join(changed)}); "
                    "use another --out or --overwrite"
                )
        return status

    # -- the lock of the process writing the run ---------------------------------------------------

    def lock_holder(self) -> int | None:
        """The id of the live process (other than this one) that holds the directory's lock, or
        None: no lock, or a stale one (its process has ended, e.g. killed with kill -9)."""
        try:
            text = (self / LOCK).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return None
        if not text.isdigit():
            return None  # not a lock poslab wrote whole: taken over
        pid = int(text)
        return pid if pid != os.getpid() and _process_alive(pid) else None

    def check_unlocked(self) -> None:
        """`RunDirError` naming the directory and the process when another live process writes it."""
        pid = self.lock_holder()
        if pid is not None:
            raise RunDirError(
                f"{self.path} is being written by process {pid} (its lock file {self / LOCK}); wait "
                f"for it to end or stop it (kill {pid}), or use another --out"
            )

    def lock(self) -> None:
        """Take the directory's lock (the directory must exist): a file holding this process's id,
        created whole (written aside, then linked into place, which fails if it exists). A stale
        lock, of a process that no longer runs, is taken over; a live one raises `RunDirError`."""
        lock = self / LOCK
        mine = self.path / f"{TMP_PREFIX}{LOCK}.{os.getpid()}{TMP_SUFFIX}"
        mine.write_text(f"{os.getpid()}\n")
        try:
            for _ in range(3):
                try:
                    os.link(mine, lock)
                    return
                except FileExistsError:
                    self.check_unlocked()
                    # Stale (or this process's own, left behind): move it away under a name of our
                    # own, so that two processes taking it over do not both succeed.
                    stale = self.path / f"{TMP_PREFIX}{LOCK}.stale.{os.getpid()}{TMP_SUFFIX}"
                    with suppress(FileNotFoundError):
                        os.replace(lock, stale)
                        stale.unlink()
            self.check_unlocked()
            raise RunDirError(f"cannot take the lock {lock}; remove it if no process writes {self.path}")
        finally:
            mine.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Give the lock back (only if this process holds it)."""
        with suppress(OSError):
            if (self / LOCK).read_text().strip() == str(os.getpid()):
                (self / LOCK).unlink()

    # -- reusing a finished run -----------------------------------------------------------------------

    def check_reusable(self, config: RunConfig) -> None:
        """`RunDirError` naming the differing keys when the finished run here was trained with a
        config other than ``config`` (beyond `REUSABLE_CHANGES`): a grid or study that reuses it as
        it is (``--resume``) would report results of another config under this one's name, e.g.
        ``compare --resume train.steps=30`` over runs of 20 steps. Does nothing when the directory
        holds no finished run."""
        if not self.is_finished():
            return
        saved = self.load_config()
        changed = [k for k in config.diff(saved) if k not in REUSABLE_CHANGES]
        if changed:
            raise RunDirError(
                f"{self.path} holds a finished run with a different config ({', '.join(changed)}), "
                "which would be reused as it is; use another --out, or --overwrite to train it again"
            )

    def clear(self) -> None:
        """Remove the files a run writes (and nothing else)."""
        for name in RUN_FILES:
            (self / name).unlink(missing_ok=True)
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files (``.<name>.<pid>.tmp``, `poslab.lab.checkpoint.atomic_write`) of
        processes that no longer run: a writer killed mid-write (kill -9) leaves one behind, as
        large as a checkpoint. Returns the paths removed."""
        removed = []
        for name in RUN_FILES:
            for tmp in self.path.glob(f"{TMP_PREFIX}{name}.*{TMP_SUFFIX}"):
                pid = tmp.name[len(TMP_PREFIX + name) + 1 : -len(TMP_SUFFIX)]
                if pid.isdigit() and not _process_alive(int(pid)):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def set_aside(self) -> Path:
        """Move the run's files into ``.replaced/`` (for ``--overwrite``): `restore` puts them back
        if the new run fails before its first checkpoint, `drop_aside` removes them after it."""
        aside = self / ASIDE
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in RUN_FILES:
            if (self / name).exists():
                os.replace(self / name, aside / name)
        return aside

    def restore(self) -> None:
        """Undo `set_aside`: the new run's files go, the old run's come back."""
        self.clear()
        aside = self / ASIDE
        for name in RUN_FILES:
            if (aside / name).exists():
                os.replace(aside / name, self / name)
        shutil.rmtree(aside, ignore_errors=True)

    def drop_aside(self) -> None:
        shutil.rmtree(self / ASIDE, ignore_errors=True)

    # -- reading and writing -------------------------------------------------------------------------

    def load_config(self) -> RunConfig:
        """The run's config.json; ValueError naming the file when it is not a run config."""
        data = _read_json(self / CONFIG, f"{self.path} holds no run ({CONFIG} is missing)")
        try:
            return RunConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self / CONFIG} is not a poslab run config: {error}") from None

    def write_config(self, config: RunConfig) -> None:
        write_text(self / CONFIG, config.to_json())

    def load_results(self) -> dict[str, Any]:
        """The results.json of a finished run; ValueError naming the file when it is not one
        (`check_results`)."""
        data = _read_json(self / RESULTS, f"{self.path} holds no finished run ({RESULTS} is missing)")
        check_results(data, self / RESULTS)
        return data

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self / RESULTS, results)

    def train_wall_time(self) -> float | None:
        """The training wall time its results.json records, or None."""
        try:
            return float(self.load_results()["wall_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's state (`poslab.lab.checkpoint.load_checkpoint`)."""
        return load_checkpoint(self / CHECKPOINT)

    def load_model(self, *, device: torch.device | str = "cpu") -> LoadedModel:
        """The model of the checkpoint, built from the config stored with its weights, in eval mode.

        Raises ValueError (one line) for a missing directory or config, a corrupt checkpoint, or
        weights that do not fit the config.
        """
        if not self.path.is_dir():
            raise ValueError(f"no such run directory: {self.path}")
        self.load_config()  # a run directory has a readable config.json
        return load_model(self / CHECKPOINT, device=device)


# -- results ---------------------------------------------------------------------------------------

# The fields of a run's results.json that readers index, and their types (`results_record`).
_RESULT_FIELDS = {"task": str, "encoding": str, "seed": int, "metrics": (dict, type(None))}


def check_results(data: Any, path: str | Path, *, required: Sequence[str] = ("metrics",)) -> None:
    """ValueError naming ``path`` unless ``data`` has the shape of a run's results.json: an object
    whose task and encoding (where given) are strings, seed an integer, metrics an object of splits
    or null; the ``required`` fields must be there."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a run's results (a JSON {type(data).__name__}, not an object)")
    for key, types in _RESULT_FIELDS.items():
        value = data.get(key)
        if key not in data:
            if key in required:
                raise ValueError(f"{path} is not a run's results (no {key!r})")
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{path} is not a run's results ({key!r} is {value!r})")
    metrics = data["metrics"] or {}
    bad = [split for split, values in metrics.items() if not isinstance(values, dict)]
    if bad:
        raise ValueError(f"{path} is not a run's results (metrics of split {bad[0]!r} are not an object)")


def results_record(
    config: RunConfig,
    task: Any,
    *,
    step: int,
    metrics: dict[str, Any] | None,
    about: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """The results of an evaluated model, as results.json holds them (and ``poslab eval --json``):
    identification, ``about`` (e.g. n_params and wall_time, or the checkpoint), the chance level,
    the task's headline metric, the metrics (`poslab.lab.evaluate.evaluate`), then ``timing``."""
    return {
        "task": config.task.name,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "step": step,
        **about,
        "chance": task.chance,
        "headline": task.headline if metrics else None,
        "metrics": metrics,
        **timing,
    }


# -- models from checkpoints -----------------------------------------------------------------------


def load_model_state(model: nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights; `CheckpointError` when they do not fit the model."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit its model config ({first[:120]})"
        ) from None


def load_model(
    path: str | Path, *, overrides: Sequence[str] = (), device: torch.device | str = "cpu"
) -> LoadedModel:
    """Rebuild the model of a checkpoint file (or a run directory's checkpoint) on ``device``, in
    eval mode. ``overrides`` (dotted ``eval.*`` keys) apply to the stored config."""
    state = load_checkpoint(path)  # CheckpointError is a ValueError
    try:
        config = RunConfig.from_dict(state["config"]).override(list(overrides))
    except (TypeError, ValueError) as error:
        if overrides:
            raise
        raise ValueError(f"{path} holds an unusable config: {error}") from None
    if Path(path).is_dir() and (Path(path) / CONFIG).is_file():
        # A run directory: its config.json says what the run is; a checkpoint of another model
        # (files copied over, an edited config) would be evaluated in its place without a word.
        saved = RunDir(path).load_config()
        changed = [k for k in RunConfig.from_dict(state["config"]).diff(saved) if not resumable_change(k)]
        if changed:
            raise ValueError(
                f"{Path(path) / CHECKPOINT} disagrees with {Path(path) / CONFIG} in {', '.join(changed)}; "
                "evaluate the checkpoint file itself if that is the model meant"
            )
    task = config.task.build()
    model = build_model(config.model_config(task))
    load_model_state(model, state, path)
    model.to(device).eval()
    return LoadedModel(config, task, model, int(state["step"]))


# -- finding runs ----------------------------------------------------------------------------------


def _hidden(run: Path, root: Path) -> bool:
    """A directory below ``root`` behind a dot-name, such as an overwritten run's `ASIDE`."""
    return any(part.startswith(".") for part in run.relative_to(root).parts)


def find_finished_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Finished run directories given directly or found below the given paths."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"no such run directory: {path}")
        if RunDir(path).is_finished():
            found.append(path)
        else:
            found.extend(
                sorted(
                    p.parent
                    for p in path.rglob(RESULTS)
                    if RunDir(p.parent).is_finished() and not _hidden(p.parent, path)
                )
            )
    if not found:
        raise ValueError(f"no finished runs ({RESULTS}) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def find_trained_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories with a checkpoint (config.json and checkpoint.pt), given directly or found
    below ``paths``."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"no such run directory: {path}")
        if (path / CONFIG).is_file():
            found.append(path)
            continue
        below = sorted(
            p.parent
            for p in path.rglob(CONFIG)
            if RunDir(p.parent).has_checkpoint() and not _hidden(p.parent, path)
        )
        if not below:
            raise ValueError(f"{path} is not a run directory and holds none ({CONFIG} + {CHECKPOINT})")
        found.extend(below)
    return list(dict.fromkeys(found))
