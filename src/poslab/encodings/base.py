"""The position-encoding interface, the registry and `build_encoding`.

A position encoding acts through up to six hooks (docs/encodings.md):

| hook       | method                              | examples                          |
|------------|-------------------------------------|-----------------------------------|
| embed      | ``embed(x, positions)``             | learned absolute, sinusoidal      |
| rotate     | ``rotate(q, k, q_pos, k_pos)``      | RoPE and its scalings             |
| bias       | ``bias(q_pos, k_pos, causal=...)``  | ALiBi, T5, Kerple, FIRE, Sandwich |
| logits     | ``logits(scores, bias, q, k, v, q_pos, k_pos, causal=...)`` | CoPE, DAPE, relative |
| input_keys | ``input_keys(x)``, passed to ``logits`` as ``extra_keys`` | CoPE's sep_key gates, FoX   |
| normalize  | ``normalize(logits, q_pos, k_pos, causal=...)``, replaces the softmax | stick-breaking |

Conventions shared by every hook:
- ``q`` is (B, H, T, Dh), ``k`` and ``v`` are (B, H, S, Dh).
- ``q_pos`` (T,) holds the absolute positions of the queries and ``k_pos`` (S,) those of the keys.
  Keys always form a prefix ``0..S-1``; queries are usually the last T of them (``S - T + arange(T)``),
  which is what cached decoding and query blocks need.
- ``scores`` are the raw logits ``A = q.k / sqrt(Dh)`` (after any rotation), (B, H, T, S).
- The causal mask is applied once, last, by the attention, never by an encoding (CoPE's gates are the
  exception: future keys get gate 0), except that a ``normalize`` hook masks its own weights.
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from poslab.registry import Registry

HOOKS = ("embed", "rotate", "bias", "logits", "input_keys", "normalize")

_REGISTRY: Registry[type[PositionEncoding]] = Registry("encoding", "encodings")


class PositionEncoding(nn.Module):
    """Base class: a subclass overrides the hooks it uses and lists them in ``hooks``.

    Class attributes a subclass sets:
        name: the registry name.
        hooks: which of ``embed``, ``rotate``, ``bias``, ``logits``, ``input_keys``, ``normalize`` it
            implements.
        shared_across_layers: the papers' default for this method (one module for all layers, or
            one per layer); a model config can override it.
        supports_causal / supports_bidirectional: which attention modes the method is defined for.
        key_lookahead: keys after a causal query that its logits depend on (0 for nearly all).

    Instance attribute:
        causal: the attention mode the module was built for (`build_encoding`'s ``causal``): True
            for a decoder, False for an encoder, None for either. Encodings with a parameter half
            that only encoders read (CoPE, relative, Kerple) build it only when ``causal`` is not
            True; a module built for one mode refuses the other (`check_mode`).
    """

    name: ClassVar[str] = ""
    hooks: ClassVar[frozenset[str]] = frozenset()
    shared_across_layers: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = True
    # Keys after a causal query that its logits still read (they are masked, but shape the result):
    # query blocks are given that many more keys, and cached decoding, which lacks them, is refused.
    key_lookahead: int = 0
    # The extra keys (``input_keys`` in ``hooks``) are the layer's own queries at every key position,
    # not ``input_keys(x)``: the model and the KV cache pass and keep q instead (selective attention).
    queries_as_extra_keys: bool = False
    causal: bool | None = None

    def __init__(self, *, n_heads: int, head_dim: int) -> None:
        super().__init__()
        check_positive(n_heads=n_heads, head_dim=head_dim)
        self.n_heads = n_heads
        self.head_dim = head_dim

    # -- hooks (each default is the identity) ---------------------------------------------------
    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings (B, T, D) at ``positions`` (T,) -> embeddings with position added."""
        return x

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Transform queries (B, H, T, Dh) and keys (B, H, S, Dh) before the dot product.

        Each key must be transformed by its own position alone: the KV cache stores rotated keys.
        """
        return q, k

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor | None:
        """Additive bias (H, T, S) that depends on positions only, or None."""
        return None

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor | None:
        """The bias as a function of the relative position n = i - j alone: (H, *offsets.shape) at
        the integer ``offsets``, for the encodings whose ``bias`` is that function of
        ``q_pos[:, None] - k_pos[None, :]`` (ALiBi, Kerple, T5, Sandwich); None (the default) for the
        others. Lets `fast_bias` compute T + S - 1 values instead of T * S."""
        return None

    def fast_bias(
        self, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None = None
    ) -> Tensor | None:
        """``bias(q_pos, k_pos)`` as the attention's fast paths compute it (the eager path calls
        ``bias``, the reference; tests hold the two equal, gradients included).

        Keys are 0..S-1; ``first``: the first query's position when the queries are consecutive
        (first, first + 1, ...), else None. Then a relative bias is computed once per distance and
        laid out as a Toeplitz matrix (`toeplitz`), whose backward sums the (H, T, S) gradient along
        its diagonals into the T + S - 1 distances. Encodings with a costlier bias override this
        (FIRE).
        """
        laid_out = toeplitz_bias(self, q_pos, k_pos, causal=causal, first=first)
        return self.bias(q_pos, k_pos, causal=causal) if laid_out is None else laid_out

    def logits(
        self,
        scores: Tensor,
        bias: Tensor | None,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        *,
        causal: bool,
    ) -> Tensor:
        """Final pre-mask logits (B, H, T, S) from ``scores`` = q.k/sqrt(Dh) and the summed ``bias``."""
        return scores if bias is None else scores + bias

    def input_keys(self, x: Tensor) -> Tensor:
        """Extra per-token keys (B, H, T, Dk) from the attention layer's input x (B, T, D).

        Only for encodings with ``input_keys`` in ``hooks``: the attention caches them alongside its
        keys and hands them (B, H, S, Dk) to ``logits`` as the keyword ``extra_keys``. Encodings with
        ``queries_as_extra_keys`` get the queries (B, H, S, Dh) there instead and need no method.
        """
        raise NotImplementedError(f"encoding {self.name!r} has no input_keys hook")

    def normalize(self, logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        """Attention weights (B, H, T, S) from the final pre-mask logits, in place of the softmax.

        Only for encodings with ``normalize`` in ``hooks`` (stick-breaking): the hook applies the causal
        mask itself (a masked key must get weight 0), and each row must depend on that row alone (query
        blocks and cached decoding compute rows separately).
        """
        raise NotImplementedError(f"encoding {self.name!r} has no normalize hook")

    def attention_block(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        q_pos: Tensor,
        k_pos: Tensor,
        keep: Tensor | None,
        *,
        causal: bool,
        save_bytes: int = 0,
        extra_keys: Tensor | None = None,
    ) -> Tensor | None:
        """Optional fused kernel for logits rewriters: softmax(logits, masked by ``keep``) @ v for one
        query block, or None to let the attention run the eager path. ``keep`` (t, S) is the causal
        visibility (None when bidirectional). It must equal the eager path exactly (up to rounding).
        ``save_bytes`` is how much memory the block may keep for backward instead of recomputing.
        ``extra_keys`` (B, H, S, Dk): the block's keys from ``input_keys``, given only to encodings
        with that hook; ``context``: the block's ``block_context``, given only to encodings that make
        one (as to ``logits``).
        """
        return None

    def block_context(
        self,
        q: Tensor,
        k: Tensor,
        extra_keys: Tensor | None,
        spans: list[tuple[int, int]],
        k_pos: Tensor,
        *,
        causal: bool,
    ) -> list[object] | None:
        """Optional per-call state for query-block attention: one object per query block, handed to
        ``logits`` as the keyword ``context`` for that block, or None (the default: blocks need
        nothing from each other). For encodings whose logits at a query read earlier queries (the
        selective penalty sums over them), so that each block does not recompute all of them.
        ``spans`` are the (lowest, highest) query positions of the blocks, in block order; q, k and
        ``extra_keys`` are the whole call's (B, H, ., .).
        """
        return None

    # -- properties the attention uses ------------------------------------------------------------
    @property
    def uses_logits(self) -> bool:
        """True when the logits hook is used: the fused SDPA kernel cannot run this encoding."""
        return "logits" in self.hooks

    @property
    def replaces_softmax(self) -> bool:
        """True when the normalize hook is used: the weights are not a softmax, so SDPA cannot run it."""
        return "normalize" in self.hooks

    def check_mode(self, causal: bool) -> None:
        """Raise ValueError when the encoding is undefined in the requested attention mode."""
        if causal and not self.supports_causal:
            raise ValueError(f"encoding {self.name!r} is not defined for causal attention")
        if not causal and not self.supports_bidirectional:
            raise ValueError(f"encoding {self.name!r} is not defined for bidirectional (encoder) attention")
        if self.causal is not None and causal != self.causal:
            built, asked = ("causal", "bidirectional") if self.causal else ("bidirectional", "causal")
            raise ValueError(
                f"encoding {self.name!r} was built for {built} attention (causal={self.causal}) and is "
                f"used in {asked} attention; build it with causal={causal} (or None for both modes)"
            )

    def check_length(self, max_position: int) -> None:
        """Raise ValueError when positions up to ``max_position`` cannot be encoded."""

    def block_channels(self, q: Tensor) -> int:
        """Channels per (batch, query, key) of the largest per-block intermediate, for sizing the
        attention's query blocks: H (the logits) unless an encoding stores more."""
        return self.n_heads

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}"


def check_positive(**values: float) -> None:
    """Raise ValueError naming the first argument that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be positive, got {value!r}")


def relative_distance(q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
    """Distance n (T, S) between each query and key: i - j (clamped at 0) if causal, else |i - j|.

    Future entries of the causal form are clamped to 0: they are masked later, and a finite value keeps
    every bias finite (DAPE's MLP and SDPA's float mask both see them).
    """
    n = q_pos[:, None] - k_pos[None, :]
    return n.clamp(min=0) if causal else n.abs()


def consecutive_start(q_pos: Tensor) -> int | None:
    """q_pos[0] when the query positions are consecutive (q_pos[0], q_pos[0] + 1, ...), else None;
    None as well while torch.compile traces, which cannot read the positions."""
    if torch.compiler.is_compiling():
        return None
    first = int(q_pos[0])
    expected = torch.arange(first, first + q_pos.shape[0], device=q_pos.device)
    return first if torch.equal(q_pos, expected) else None


def toeplitz_bias(
    encoding: PositionEncoding, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None
) -> Tensor | None:
    """The encoding's ``relative_bias`` at the T + S - 1 distances of consecutive queries at first,
    first + 1, ... and keys 0..S-1, laid out (H, T, S) by `toeplitz`; None when the queries are not
    known to be consecutive (first None) or the bias is not relative."""
    if first is None:
        return None
    n_queries, n_keys = q_pos.shape[0], k_pos.shape[0]
    offsets = torch.arange(first - n_keys + 1, first + n_queries, device=q_pos.device)
    table = encoding.relative_bias(offsets, causal=causal)  # (H, T + S - 1)
    return None if table is None else toeplitz(table, n_queries, n_keys)


def toeplitz(table: Tensor, n_queries: int, n_keys: int) -> Tensor:
    """(H, T, S) with entry (h, i, j) = table[h, S - 1 + i - j]: a relative bias at the distances
    n = i - j + first, tabulated from n = first - S + 1 (table (H, T + S - 1)).

    Every row is a window of the reversed table (one view, one copy); autograd sums the gradient
    along the diagonals, as fast on CPU as a hand-written diagonal sum."""
    return table.flip(-1).unfold(-1, n_keys, 1).flip(1)  # (H, T, S)


def takes_mode(cls: type[PositionEncoding]) -> bool:
    """Whether the class's constructor takes the attention mode ``causal`` (see `build_encoding`)."""
    return "causal" in inspect.signature(cls.__init__).parameters


def causal_half(tensor: Tensor, causal: bool | None, rows: int) -> Tensor:
    """``tensor`` as built for ``causal``: its first ``rows`` rows alone (a copy) for a decoder, else
    all of it. Random initialisations draw both halves in every mode and keep the first for a
    decoder, so a decoder draws the same numbers, in the same order, as an encoder."""
    return tensor[:rows].clone() if causal else tensor


def load_causal_half(
    module: PositionEncoding,
    state_dict: dict[str, Tensor],
    prefix: str,
    error_msgs: list[str],
    layouts: dict[str, tuple[tuple[int, ...], Callable[[Tensor], Tensor]]],
) -> None:
    """For ``_load_from_state_dict``: a decoder module (``causal=True``) takes a saved parameter in the
    both-halves layout of older checkpoints by keeping its first half. ``layouts[name]`` is that
    layout's shape and the function picking the causal half of it. A saved shape that is neither
    the module's own nor (for a decoder) the both-halves one is reported in ``error_msgs``."""
    for name, (both_shape, first_half) in layouts.items():
        key = prefix + name
        saved = state_dict.get(key)
        want = tuple(getattr(module, name).shape)
        if saved is None or tuple(saved.shape) == want:
            continue
        if module.causal and tuple(saved.shape) == both_shape:
            state_dict[key] = first_half(saved)
            continue
        accepted = f"{want} or, from older checkpoints, {both_shape}" if module.causal else f"{want}"
        hint = (
            ""
            if module.causal
            else " (a decoder's parameter lacks the half for keys after the query; build the encoding "
            "with causal=True to load it)"
        )
        error_msgs.append(
            f"{key}: saved shape {tuple(saved.shape)} does not fit encoding {module.name!r} built for "
            f"causal={module.causal}, which takes {accepted}{hint}"
        )


def causal_mask(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean (T, S) mask, True where key j may be seen by query i (j <= i)."""
    return k_pos[None, :] <= q_pos[:, None]


def register(name: str) -> Callable[[type[PositionEncoding]], type[PositionEncoding]]:
    """Class decorator adding an encoding to the registry under ``name``."""

    def wrap(cls: type[PositionEncoding]) -> type[PositionEncoding]:
        if not set(cls.hooks) <= set(HOOKS):
            raise ValueError(f"{cls.__name__}.hooks has unknown entries: {set(cls.hooks) - set(HOOKS)}")
        _REGISTRY.add(name, cls)
        cls.name = name
        return cls

    return wrap


def list_encodings() -> list[str]:
    """Names of all registered encodings (compose them with '+', e.g. 'cope+rope')."""
    return _REGISTRY.names()


def encoding_class(name: str) -> type[PositionEncoding]:
    """The class registered as ``name``; ValueError listing the known names otherwise."""
    return _REGISTRY.lookup(name)


def accepts_option(name: str, option: str) -> bool:
    """Whether the encoding ``name`` (or some part of a composition such as 'cope+rope') takes ``option``."""
    return any(option in encoding_options(encoding_class(part)) for part in name.split("+"))


def encoding_options(cls: type[PositionEncoding]) -> dict[str, Any]:
    """Keyword options of an encoding class with their defaults (n_heads, head_dim and the attention
    mode ``causal``, which `build_encoding` passes, excluded)."""
    params = inspect.signature(cls.__init__).parameters
    return {
        key: p.default
        for key, p in params.items()
        if key not in ("self", "n_heads", "head_dim", "causal") and p.kind is p.KEYWORD_ONLY
    }


_SPEC = re.compile(r"^\s*([A-Za-z0-9_+]+)\s*(?:\[(.*)\])?\s*$")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``'dape[base=kerple_log,width=16]'`` into ``('dape', {'base': 'kerple_log', 'width': 16})``.

    Values are parsed as int, float, bool (true/false) or None (none) where they look like one, else
    kept as strings. This lets a grid of experiments name configured encodings in one string.
    """
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"cannot parse encoding spec {spec!r}; expected 'name' or 'name[key=value,...]'")
    name, body = match.group(1), match.group(2)
    options: dict[str, Any] = {}
    if body:
        for item in re.split(r",(?![^()]*\))", body):  # a comma inside (...) is part of a value
            if "=" not in item:
                raise ValueError(f"encoding spec {spec!r}: option {item.strip()!r} has no '='")
            key, value = (part.strip() for part in item.split("=", 1))
            options[key] = parse_value(value)
    return name, options


def parse_value(text: str) -> Any:
    """Best-effort literal parsing for command-line and spec values."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# The class that builds a composition 'a+b' (`poslab.encodings.compose.Composite`, which registers
# itself): it builds its parts with `build_encoding`, so importing it here would be a cycle.
_COMPOSITION: list[type[PositionEncoding]] = []


def register_composition(cls: type[PositionEncoding]) -> type[PositionEncoding]:
    """Class decorator: ``cls(names, n_heads=, head_dim=, **options)`` builds 'a+b' compositions."""
    _COMPOSITION[:] = [cls]
    return cls


def build_encoding(
    name: str, *, n_heads: int, head_dim: int, causal: bool | None = None, **options: Any
) -> PositionEncoding:
    """Build a position encoding by registry name (docs/encodings.md).

    Args:
        name: a registered name (``list_encodings()``), a composition such as ``'cope+rope'``, or a
            spec with options such as ``'dape[base=kerple_log]'``.
        n_heads: attention heads H.
        head_dim: channels per head Dh.
        causal: the attention mode the module will serve: True (decoder), False (encoder) or None
            (either). A decoder's CoPE, relative and Kerple parameters then hold the causal half
            alone (the papers' shapes); `poslab.Transformer` passes its config's mode.
        **options: keyword options of the encoding class. For a composition, an option goes to every
            part that accepts it, or to one part when given as ``part_name={...}``.

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown option, bad value.
    """
    name, spec_options = parse_spec(name)
    options = {**spec_options, **options}
    if "+" in name:
        (composite,) = _COMPOSITION
        return composite(name.split("+"), n_heads=n_heads, head_dim=head_dim, causal=causal, **options)
    cls = encoding_class(name)
    known = encoding_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for encoding {name!r}; accepted options: {accepted}"
        )
    for key, value in options.items():
        check_option_type(name, cls, key, value)
    mode = {"causal": causal} if takes_mode(cls) else {}
    try:
        return cls(n_heads=n_heads, head_dim=head_dim, **mode, **options)
    except OverflowError as error:  # e.g. rope[scaling=ntk,factor=1e308]: base * factor ** ... overflows
        given = ", ".join(f"{k}={v!r}" for k, v in options.items() if isinstance(v, (int, float)))
        raise ValueError(f"encoding {name!r}: option(s) {given or 'given'} out of range ({error})") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (types not listed here are not checked)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def check_option_type(name: str, cls: type[PositionEncoding], key: str, value: Any) -> None:
    """ValueError naming option ``key`` of encoding ``name`` when ``value`` is not of the type its
    class annotates (``rope[base=abc]``, ``dape[width=1.5]``, ``dape[base_options=x]``), or is a
    float that is not finite (``rope[base=inf]``): the class would otherwise fail with a TypeError
    deep inside, or build an encoding of NaNs."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(key)
    except Exception:  # an annotation that does not resolve: leave the value to the class
        return
    if hint is None or _fits(value, hint):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"encoding {name!r}: option {key} must be finite, got {value!r}")
    expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    raise ValueError(f"encoding {name!r}: option {key} must be {expected}, got {value!r}")


def as_float(t: Tensor, like: Tensor) -> Tensor:
    """Cast a position tensor to the floating dtype and device of ``like``."""
    return t.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
