"""Run configuration: frozen, keyword-only dataclasses for the model, the task, training and
evaluation, validated on construction, plus dotted overrides (``train.steps=200``).

A `RunConfig` is everything needed to reproduce a run; `poslab.lab.train` writes it to ``config.json``
before anything else. The vocabulary size, the output head, causality and the training length come
from the task, so the model section is `ModelSpec`: the fields of `poslab.model.ModelConfig` without
those four.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from poslab.encodings.base import accepts_option, parse_spec, parse_value
from poslab.lab.parsing import check_int, split_list
from poslab.lab.tasks import build_task
from poslab.model import ModelConfig, normalize_encoding

# ModelConfig fields a run takes from its task instead of from the config.
TASK_GIVEN = ("vocab_size", "n_outputs", "causal", "train_len")
LOSS_MODES = ("scored", "all")
MAPPING_FIELDS = ("options", "encoding_options")


def _check_float(key: str, value: Any, *, low: float, high: float | None = None) -> float:
    """``value`` as a float in [low, high] (high open when given); ValueError naming ``key``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value < high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{key} must be a number {bound}, got {value!r}")
    return float(value)


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass inside its ``__post_init__``."""
    object.__setattr__(obj, name, value)


# -- model -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model section of a run: every `poslab.model.ModelConfig` field except vocab_size,
    n_outputs, causal and train_len, which the task gives (see `ModelConfig` for what each field
    means; a test keeps the two in step)."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None
    dropout: float = 0.0
    # one spec, or one per layer (cycled): a list, or model.encoding=rope,rope,rope,nope on the
    # command line (commas inside [...] belong to a spec); kept as a tuple
    encoding: str | tuple[str, ...] = "rope"
    encoding_options: dict[str, Any] = field(default_factory=dict)
    share_encoding: bool | None = None
    norm: str = "pre"
    tie_embeddings: bool = False
    max_len: int = 1024
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.encoding_options, dict):
            raise ValueError(f"model.encoding_options must be a mapping, got {self.encoding_options!r}")
        _set(self, "encoding", normalize_encoding(self.encoding))
        # ModelConfig validates every field (its messages name them model.<field>) and builds the
        # encoding once. The run config checks again with the task's sizes and attention mode.
        self.to_model_config(vocab_size=1, n_outputs=None, causal=True)

    def to_model_config(
        self, *, vocab_size: int, n_outputs: int | None, causal: bool, train_len: int | None = None
    ) -> ModelConfig:
        """The full `ModelConfig` with the sizes, causality and training length a task gives."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ModelConfig(
            vocab_size=vocab_size, n_outputs=n_outputs, causal=causal, train_len=train_len, **values
        )


# -- task, training, evaluation --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Which task to train on, and at what length (docs/tasks.md)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # the task constructor's keyword options
    # Length passed to Task.sample for training: pairs (flip-flop), content tokens (selective copy),
    # maximum statements (counting). None for tasks whose "id" split is a range of lengths (the
    # Chomsky tasks: each training batch draws its length uniformly from it).
    train_len: int | None = None
    # 0: fresh samples at every step. N > 0: a fixed training set of N sequences drawn once from the
    # training seed, batches drawn from it with replacement (the CoPE paper's counting runs: 10k).
    train_pool: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"task.name must be a task name, got {self.name!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"task.options must be a mapping, got {self.options!r}")
        if self.train_len is not None:
            check_int("task.train_len", self.train_len, minimum=1)
        check_int("task.train_pool", self.train_pool, minimum=0)
        task = self.build()  # unknown name or option -> ValueError naming it
        if task.split_lengths("id") is not None:
            if self.train_len is not None:
                raise ValueError(
                    f"task {self.name!r} draws its training lengths from its 'id' split; leave "
                    f"task.train_len unset (got {self.train_len}), set task.options.max_train_len"
                )
            if self.train_pool:
                raise ValueError(
                    f"task.train_pool needs a fixed training length; task {self.name!r} has a range"
                )
        elif self.train_len is None:
            raise ValueError(f"task {self.name!r} needs task.train_len (the training length)")

    def build(self):
        """The `poslab.lab.tasks.Task` this section describes."""
        return build_task(self.name, **self.options)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """AdamW with linear warmup and cosine decay, gradient clipping, the seed, and the schedule of
    logging, evaluation and checkpoints."""

    steps: int = 1000
    batch_size: int = 32  # global batch; under DDP each process takes batch_size / world_size rows
    lr: float = 3e-3  # peak learning rate, reached at the end of the warmup
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup: int = 100  # linear warmup steps (capped at `steps`)
    weight_decay: float = 0.1  # AdamW decay, on weight matrices and embedding tables only
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    loss: str = "scored"  # 'scored': loss on the task's scored positions; 'all': every target
    log_every: int = 50  # steps between training-loss records in metrics.jsonl
    eval_every: int = 500  # steps between evaluations; 0: only at the end
    checkpoint_every: int = 500  # steps between checkpoints; 0: only at the end
    seed: int = 0  # model init, training data and every other random number of the run
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            check_int(f"train.{key}", getattr(self, key), minimum=1)
        for key in ("warmup", "log_every", "eval_every", "checkpoint_every", "seed"):
            check_int(f"train.{key}", getattr(self, key), minimum=0)
        if self.seed >= 2**32:
            raise ValueError(f"train.seed must be below 2**32, got {self.seed}")
        _set(self, "lr", _check_float("train.lr", self.lr, low=0.0))
        if self.lr == 0:
            raise ValueError("train.lr must be positive, got 0")
        _set(self, "min_lr_ratio", _check_float("train.min_lr_ratio", self.min_lr_ratio, low=0.0))
        if self.min_lr_ratio > 1:
            raise ValueError(f"train.min_lr_ratio must be at most 1, got {self.min_lr_ratio}")
        for key in ("beta1", "beta2"):
            _set(self, key, _check_float(f"train.{key}", getattr(self, key), low=0.0, high=1.0))
        for key in ("weight_decay", "grad_clip"):
            _set(self, key, _check_float(f"train.{key}", getattr(self, key), low=0.0))
        if self.loss not in LOSS_MODES:
            raise ValueError(f"train.loss must be one of {', '.join(LOSS_MODES)}, got {self.loss!r}")
        kind = self.device.split(":")[0] if isinstance(self.device, str) else None
        if kind not in ("auto", "cpu", "cuda") or (kind != "cuda" and ":" in self.device):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation: which splits, at what length, on how much data.

    The data comes from seeds derived from ``seed`` that no training seed can equal (see
    `poslab.lab.evaluate.eval_seed`), the same for every run, so all runs are scored on one test set.
    """

    splits: tuple[str, ...] | None = None  # None: every split of the task
    length: int | None = None  # length for fixed-length splits; None: task.train_len
    len_stride: int = 1  # splits with a length range (Chomsky): evaluate every len_stride-th length
    batches: int = 8  # held-out batches per split (per length for length-range splits)
    batch_size: int = 64
    seed: int = 0
    # Language models (`poslab lm-extrapolation`): the largest length scored, as L, 2L, 4L, ... up
    # to it; None: 64L on a GPU, 32L on a CPU.
    extrapolate_to: int | None = None

    def __post_init__(self) -> None:
        if self.splits is not None:
            splits = self.splits
            if isinstance(splits, str):  # the command line: eval.splits=id,ood_dense
                splits = split_list(splits)
            if not isinstance(splits, (list, tuple)) or not all(isinstance(s, str) for s in splits):
                raise ValueError(f"eval.splits must be a list of split names, got {self.splits!r}")
            if not splits:
                raise ValueError("eval.splits must name at least one split (or be none for all)")
            _set(self, "splits", tuple(splits))
        for key in ("length", "extrapolate_to"):
            if getattr(self, key) is not None:
                check_int(f"eval.{key}", getattr(self, key), minimum=1)
        for key in ("len_stride", "batches", "batch_size"):
            check_int(f"eval.{key}", getattr(self, key), minimum=1)
        check_int("eval.seed", self.seed, minimum=0)
        if self.seed >= 2**31:
            raise ValueError(f"eval.seed must be below 2**31, got {self.seed}")


SECTIONS = {"model": ModelSpec, "task": TaskConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One training run: the model, the task, training and evaluation."""

    task: TaskConfig
    model: ModelSpec = field(default_factory=lambda: ModelSpec())
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"RunConfig.{name} must be a {cls.__name__}")
        task = self.task.build()
        self.model_config(task)  # the encoding must support the task's attention mode
        if self.train.loss == "all" and not task.causal:
            raise ValueError(
                f"train.loss=all needs a causal (language-model) task; {task.name!r} is an encoder "
                "task whose targets exist only at the scored positions"
            )
        splits = task.splits()
        if self.eval.splits is not None:
            unknown = [s for s in self.eval.splits if s not in splits]
            if unknown:
                raise ValueError(
                    f"unknown eval split(s) {', '.join(unknown)} for task {task.name!r}; "
                    f"its splits: {', '.join(splits)}"
                )
        if self.eval.length is not None and all(task.split_lengths(s) is not None for s in splits):
            raise ValueError(
                f"eval.length does not apply to task {task.name!r}, whose splits are length "
                "ranges; use eval.len_stride or the task's max_eval_len option"
            )

    def model_config(self, task) -> ModelConfig:
        """The full `ModelConfig` for ``task`` (vocabulary, output head and causality from it, the
        training length from ``task.train_len``)."""
        config = self.model.to_model_config(
            vocab_size=task.vocab_size,
            n_outputs=task.n_outputs,
            causal=task.causal,
            train_len=self.task.train_len,
        )
        for encoding in config.distinct_encodings():
            encoding.check_mode(task.causal)
        return config

    @property
    def encoding_label(self) -> str:
        """The encoding with its options as one spec string: ``'dape[base=kerple_log]'``."""
        return encoding_label(self.model.encoding, self.model.encoding_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_dict`; an unknown section or key raises ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a run config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
            valid = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - valid)
            if bad:
                raise ValueError(
                    f"unknown option(s) {', '.join(f'{name}.{k}' for k in bad)}; "
                    f"valid: {', '.join(valid_keys(name))}"
                )
            sections[name] = section_cls(**values)
        return cls(**sections)

    def override(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """A copy with dotted assignments applied: ``["train.steps=200", "model.encoding=cope"]``.

        Keys are ``section.field`` or, for mapping fields, ``section.field.key``
        (``task.options.p=0.9``, ``model.encoding_options.npos_max=32``). String values are parsed
        with `poslab.encodings.base.parse_value`. An unknown key raises ValueError naming it and the
        valid keys.
        """
        if isinstance(assignments, dict):
            items = list(assignments.items())
        else:
            items = [split_assignment(text) for text in assignments]
        data = self.to_dict()
        for key, value in items:
            set_dotted(data, key, value)
        return RunConfig.from_dict(data)

    def diff(self, other: RunConfig) -> list[str]:
        """The dotted keys whose values differ between two configs."""
        mine, theirs = flatten(self.to_dict()), flatten(other.to_dict())
        return sorted(
            k for k in mine.keys() | theirs.keys() if mine.get(k, _ABSENT) != theirs.get(k, _ABSENT)
        )


_ABSENT = object()


# -- dotted keys -----------------------------------------------------------------------------------


def valid_keys(section: str | None = None) -> list[str]:
    """Every settable dotted key (of one section); mapping fields end in ``.<key>``."""
    keys = []
    for name, cls in SECTIONS.items():
        if section is None or name == section:
            for f in dataclasses.fields(cls):
                suffix = ".<key>" if f.name in MAPPING_FIELDS else ""
                keys.append(f"{name}.{f.name}{suffix}")
    return keys


def split_assignment(text: str) -> tuple[str, Any]:
    """``'train.steps=200'`` -> ``('train.steps', 200)``, the value parsed with `parse_value`."""
    if "=" not in text:
        raise ValueError(f"expected an option as key=value (e.g. train.steps=200), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``section.field`` or ``section.mapping.key`` in a dict shaped as `RunConfig.to_dict`."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS or parts[1] not in data[parts[0]]:
        raise ValueError(f"unknown option {key!r}; valid options: {', '.join(valid_keys())}")
    section, name = data[parts[0]], parts[1]
    if name in MAPPING_FIELDS:
        if len(parts) == 2:
            if isinstance(value, dict):
                section[name] = value
                return
            raise ValueError(f"{key} is a mapping; set its entries as {key}.<key>=value")
        target = section[name]
        for part in parts[2:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"cannot set {key!r}: {part!r} is not a mapping")
        target[parts[-1]] = value
        return
    if len(parts) > 2:
        raise ValueError(f"unknown option {key!r}: {parts[0]}.{name} is not a mapping")
    section[name] = _coerce(key, section[name], value)


def _coerce(key: str, current: Any, value: Any) -> Any:
    """Match a parsed command-line value to the type of the field's current value."""
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        return format_value(value)
    return value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf value}; tuples become lists (as after a JSON round trip)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def encoding_label(encoding: str | tuple[str, ...], options: dict[str, Any] | None = None) -> str:
    """An encoding and its options as one spec string that `parse_spec` reads back; a per-layer
    schedule as its specs joined by commas, each with the options it takes."""
    if not isinstance(encoding, str):
        specs = normalize_encoding(encoding)
        if not isinstance(specs, str):
            return ",".join(
                encoding_label(
                    s, {k: v for k, v in (options or {}).items() if accepts_option(parse_spec(s)[0], k)}
                )
                for s in specs
            )
        encoding = specs
    name, spec_options = parse_spec(encoding)
    merged = {**spec_options, **(options or {})}
    if not merged:
        return name
    return f"{name}[{','.join(f'{k}={format_value(v)}' for k, v in merged.items())}]"


def slug(text: str) -> str:
    """A directory name for an encoding spec: ``'dape[base=fire]'`` -> ``'dape_base=fire'``."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_")


def format_value(value: Any) -> str:
    """The command-line spelling of a value (inverse of `parse_value` for simple values)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
