"""Composition of encodings by name with '+', e.g. 'cope+rope' (RoPE rotates, CoPE adds logits)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from poslab.encodings.base import (
    PositionEncoding,
    build_encoding,
    encoding_class,
    encoding_options,
    register_composition,
    toeplitz_bias,
)


@register_composition
class Composite(PositionEncoding):
    """Several encodings acting together through their hooks (docs/encodings.md).

    embed and rotate are applied in order, biases are summed, and logits rewriters run in order:
    the first receives the raw logits A and the summed bias, each later one the previous output (with
    no bias). So in 'cope+relative' CoPE's gates read the plain q.k, and relative adds its term after.

    An option goes to every part whose class accepts it (ValueError if none does); ``name={...}``
    gives options to one part only, e.g. ``build_encoding('cope+rope', rope={'base': 500000})``.
    """

    def __init__(
        self, names: list[str], *, n_heads: int, head_dim: int, causal: bool | None = None, **options: Any
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.causal = causal  # passed to every part (see `build_encoding`)
        if len(names) < 2 or any(not n for n in names):
            raise ValueError(f"bad composition {'+'.join(names)!r}; expected e.g. 'cope+rope'")
        if len(set(names)) != len(names):
            raise ValueError(f"composition {'+'.join(names)!r} names a part twice")
        classes = [encoding_class(n) for n in names]
        per_part: list[dict[str, Any]] = [dict(options.pop(n, None) or {}) for n in names]
        for key, value in options.items():
            takers = [i for i, cls in enumerate(classes) if key in encoding_options(cls)]
            if not takers:
                raise ValueError(f"no part of {'+'.join(names)!r} accepts option {key!r}")
            for i in takers:
                per_part[i].setdefault(key, value)
        self.parts = nn.ModuleList(
            build_encoding(n, n_heads=n_heads, head_dim=head_dim, causal=causal, **o)
            for n, o in zip(names, per_part, strict=True)
        )
        self.name = "+".join(names)
        self.hooks = frozenset().union(*(p.hooks for p in self.parts))
        # the parts that read the layer input
        self._keyed = [i for i, p in enumerate(self.parts) if "input_keys" in p.hooks]
        if len(self._keyed) > 1:
            raise ValueError(f"composition {self.name!r}: at most one part may have an input_keys hook")
        self.queries_as_extra_keys = any(p.queries_as_extra_keys for p in self.parts)
        self._normalizer = [i for i, p in enumerate(self.parts) if p.replaces_softmax]
        if len(self._normalizer) > 1:
            raise ValueError(f"composition {self.name!r}: at most one part may replace the softmax")
        self.shared_across_layers = all(p.shared_across_layers for p in self.parts)
        self.supports_causal = all(p.supports_causal for p in self.parts)
        self.supports_bidirectional = all(p.supports_bidirectional for p in self.parts)
        self.key_lookahead = max(p.key_lookahead for p in self.parts)

    def check_length(self, max_position: int) -> None:
        for part in self.parts:
            part.check_length(max_position)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        for part in self.parts:
            x = part.embed(x, positions)
        return x

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            q, k = part.rotate(q, k, q_pos, k_pos)
        return q, k

    def input_keys(self, x: Tensor) -> Tensor:
        return self.parts[self._keyed[0]].input_keys(x)

    def normalize(self, logits: Tensor, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
        return self.parts[self._normalizer[0]].normalize(logits, q_pos, k_pos, causal=causal)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor | None:
        total = None
        for part in self.parts:
            b = part.bias(q_pos, k_pos, causal=causal)
            if b is not None:
                total = b if total is None else total + b
        return total

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor | None:
        total = None
        for part in self.parts:
            if "bias" in part.hooks:
                table = part.relative_bias(offsets, causal=causal)
                if table is None:  # a part's bias depends on more than i - j
                    return None
                total = table if total is None else total + table
        return total

    def fast_bias(
        self, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None = None
    ) -> Tensor | None:
        laid_out = toeplitz_bias(self, q_pos, k_pos, causal=causal, first=first)  # one table, summed
        if laid_out is not None:
            return laid_out
        total = None
        for part in self.parts:
            b = part.fast_bias(q_pos, k_pos, causal=causal, first=first)
            if b is not None:
                total = b if total is None else total + b
        return total

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
        extra_keys: Tensor | None = None,
    ) -> Tensor:
        rewriters = [i for i, p in enumerate(self.parts) if p.uses_logits]
        if not rewriters:
            return super().logits(scores, bias, q, k, v, q_pos, k_pos, causal=causal)
        for i in rewriters:
            part = self.parts[i]
            extra = {"extra_keys": extra_keys} if i in self._keyed else {}
            scores = part.logits(scores, bias, q, k, v, q_pos, k_pos, causal=causal, **extra)
            bias = None
        return scores

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0, extra_keys=None):
        rewriters = [i for i, p in enumerate(self.parts) if p.uses_logits]
        if len(rewriters) != 1 or self.replaces_softmax:
            return None
        extra = {"extra_keys": extra_keys} if rewriters[0] in self._keyed else {}
        return self.parts[rewriters[0]].attention_block(
            q, k, v, bias, q_pos, k_pos, keep, causal=causal, save_bytes=save_bytes, **extra
        )

    def block_channels(self, q: Tensor) -> int:
        return max(p.block_channels(q) for p in self.parts)

    def extra_repr(self) -> str:
        return f"{self.name}"
