"""Tokenizers for the language-modelling runs: raw UTF-8 bytes, or a byte-level BPE trained locally.

    tok = build_tokenizer("bytes")                          # 256 byte ids + "<eos>" = 257
    tok = build_tokenizer("bpe", texts=train_texts, vocab_size=4096)
    tok.save(run_dir); same = load_tokenizer(run_dir)       # run_dir/tokenizer.json

Both map any string to ids and back exactly (``decode(encode(s)) == s``). Special tokens get the
ids after the ordinary ones and are never produced by `encode` (the text "<eos>" is encoded as its
characters); the LM data puts `eos_id` between documents. The BPE tokenizer uses the Hugging Face
``tokenizers`` library (the ``bpe`` extra), trained on the training split only, and is saved in that
library's tokenizer.json format so that an evaluation reuses exactly the same vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from poslab.registry import check_keyword_options

TOKENIZER_FILE = "tokenizer.json"
EOS = "<eos>"


class Tokenizer:
    """Common interface; ``vocab_size`` counts the special tokens."""

    name: ClassVar[str] = ""
    vocab_size: int
    special_tokens: tuple[str, ...]

    @property
    def eos_id(self) -> int | None:
        """Id of the "<eos>" special token (the document separator), if this tokenizer has one."""
        return self.token_id(EOS) if EOS in self.special_tokens else None

    def token_id(self, token: str) -> int:
        """Id of a special token."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their names."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as an int64 array (faster than `encode` for many texts)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def to_json(self) -> str:
        """The tokenizer.json text that `load_tokenizer` reads back."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` (creating the directory) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _check_specials(special_tokens: Sequence[str]) -> tuple[str, ...]:
    specials = tuple(special_tokens)
    if any(not isinstance(s, str) or not s for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    return specials


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: id b for byte b (0..255), then one id per special token (256, 257, ...)."""

    name = "bytes"

    def __init__(self, *, special_tokens: Sequence[str] = (EOS,)) -> None:
        self.special_tokens = _check_specials(special_tokens)
        self.vocab_size = 256 + len(self.special_tokens)

    @classmethod
    def build(cls, texts: Iterable[str] | None = None, **options: Any) -> ByteTokenizer:
        return cls(**options)

    def token_id(self, token: str) -> int:
        return 256 + self.special_tokens.index(token)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Bytes between special tokens are decoded together; a window cut inside a multi-byte
        # character decodes with U+FFFD.
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            parts.append(run.decode("utf-8", errors="replace"))
            parts.append(self.special_tokens[i - 256])
            run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "special_tokens": list(self.special_tokens)}) + "\n"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "the 'bpe' tokenizer needs the Hugging Face tokenizers library: pip install 'poslab[bpe]'"
        ) from err
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style, no prefix space) from the Hugging Face ``tokenizers`` library.

    Built by `train` or loaded from a tokenizer.json; ``backend`` is the ``tokenizers.Tokenizer``.
    """

    name = "bpe"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = json.loads(backend.to_str()).get("added_tokens", [])
        self.special_tokens = tuple(t["content"] for t in added if t.get("special"))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 4096,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (EOS,),
    ) -> BPETokenizer:
        """Train on ``texts`` (the training split only, so held-out text never shapes the vocab).

        vocab_size: the target size, counting the 256 byte symbols and the special tokens; the
        result is smaller when the texts support fewer merges. min_frequency: the fewest
        occurrences for a merge.
        """
        tk = _import_tokenizers()
        specials = _check_specials(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size must be at least 256 + {len(specials)} special token(s), got {vocab_size}"
            )
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def build(cls, texts: Iterable[str] | None = None, **options: Any) -> BPETokenizer:
        if texts is None:
            raise ValueError("the 'bpe' tokenizer is trained: pass texts= (the training split)")
        return cls.train(texts, **options)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()


TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    ByteTokenizer.name: ByteTokenizer.build,
    BPETokenizer.name: BPETokenizer.build,
}
_OPTIONS: dict[str, Callable[..., Any]] = {
    "bytes": ByteTokenizer.__init__,
    "bpe": BPETokenizer.train,
}


def list_tokenizers() -> list[str]:
    """Names of the tokenizers `build_tokenizer` knows."""
    return sorted(TOKENIZERS)


def build_tokenizer(name: str, *, texts: Iterable[str] | None = None, **options: Any) -> Tokenizer:
    """Build the tokenizer ``name`` ("bytes" or "bpe"); a trained one learns from ``texts``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(TOKENIZERS)}")
    check_keyword_options("tokenizer", name, _OPTIONS[name], options)
    return TOKENIZERS[name](texts, **options)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved by `Tokenizer.save` in ``directory``."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"no tokenizer saved in {directory} ({path} does not exist)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a tokenizer file: {err}") from err
    if data.get("type") == "bytes":
        return ByteTokenizer(special_tokens=data.get("special_tokens", ()))
    if isinstance(data.get("model"), dict) and data["model"].get("type") == "BPE":
        return BPETokenizer.from_file(path)
    raise ValueError(f"{path} is neither a poslab byte tokenizer nor a BPE tokenizer.json")
