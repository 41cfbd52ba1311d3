"""Transformer models with a pluggable position encoding: a decoder LM and an encoder.

Pre-LN by default (post-LN as an option, as in the CoPE paper's counting runs), GELU MLP, optional
tied embeddings. The encoding is chosen by name and built per layer or once for all layers, as each
paper does (``ModelConfig.share_encoding``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslab.attention import IMPLS, attend
from poslab.encodings.base import PositionEncoding, accepts_option, build_encoding, parse_spec

NORMS = ("pre", "post")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder LM (``causal=True``) or a bidirectional encoder (``causal=False``)."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # MLP hidden width; None means 4 * d_model
    dropout: float = 0.0  # on the residual branches and embeddings
    encoding: str = "rope"  # registry name, composition ('cope+rope') or spec ('dape[base=fire]')
    encoding_options: dict[str, Any] = field(default_factory=dict)
    share_encoding: bool | None = None  # one encoding module for all layers; None: the method's default
    norm: str = "pre"  # 'pre' or 'post' layer norm
    tie_embeddings: bool = False  # output head shares the input embedding (needs n_outputs == vocab)
    causal: bool = True
    n_outputs: int | None = None  # size of the output head; None means vocab_size
    max_len: int = 1024  # table size for encodings that have one (learned absolute), if not set
    train_len: int | None = None  # the training length, for encodings initialised from it (FIRE)
    attn_impl: str = "auto"  # 'auto', 'fused', 'triton' or 'eager' (see poslab.attend)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        if self.train_len is not None and (not isinstance(self.train_len, int) or self.train_len <= 0):
            raise ValueError(f"model.train_len must be a positive integer or None, got {self.train_len!r}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"model.d_ff must be positive, got {self.d_ff!r}")
        if self.n_outputs is not None and self.n_outputs <= 0:
            raise ValueError(f"model.n_outputs must be positive, got {self.n_outputs!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"model.attn_impl must be one of {', '.join(IMPLS)}, got {self.attn_impl!r}")
        if self.tie_embeddings and self.output_size != self.vocab_size:
            raise ValueError(
                f"model.tie_embeddings needs n_outputs == vocab_size, got {self.output_size} != "
                f"{self.vocab_size}"
            )
        # Fail now, not at the first forward: build the encoding once to validate name and options.
        self.build_encoding()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def output_size(self) -> int:
        return self.n_outputs if self.n_outputs is not None else self.vocab_size

    def build_encoding(self) -> PositionEncoding:
        """One encoding module as configured (``max_len`` and ``train_len`` filled in where the
        encoding takes them and they are not set)."""
        name, spec_options = parse_spec(self.encoding)
        options = {**spec_options, **self.encoding_options}
        for key, value in (("max_len", self.max_len), ("train_len", self.train_len)):
            if value is not None and key not in options and accepts_option(name, key):
                options[key] = value
        return build_encoding(name, n_heads=self.n_heads, head_dim=self.head_dim, **options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVCache:
    """Per-layer keys and values seen so far, (B, H, S, Dh) each; positions are 0..S-1.

    Each layer's keys and values live in a buffer with spare capacity along the sequence axis
    (doubled when full), so a decoding step writes one new position instead of copying the whole
    cache; ``append`` returns views of the filled part.
    """

    def __init__(self, n_layers: int) -> None:
        self._keys: list[Tensor | None] = [None] * n_layers
        self._values: list[Tensor | None] = [None] * n_layers
        self._lengths = [0] * n_layers

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls(n_layers)

    @property
    def length(self) -> int:
        """Positions cached so far (in the first layer; all layers agree between forward calls)."""
        return self._lengths[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's keys/values (B, H, T, Dh) for one layer and return all of them."""
        n, t = self._lengths[layer], k.shape[2]
        keys, values = self._keys[layer], self._values[layer]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Autograd needs the earlier views unchanged: concatenate instead of writing in place.
            if n:
                k, v = torch.cat((keys[:, :, :n], k), dim=2), torch.cat((values[:, :, :n], v), dim=2)
            self._keys[layer], self._values[layer], self._lengths[layer] = k, v, n + t
            return k, v
        if keys is None or n + t > keys.shape[2]:
            capacity = max(2 * (n + t), 64)
            new_keys = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_values = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if keys is not None:
                new_keys[:, :, :n] = keys[:, :, :n]
                new_values[:, :, :n] = values[:, :, :n]
            keys, values = self._keys[layer], self._values[layer] = new_keys, new_values
        keys[:, :, n : n + t] = k
        values[:, :, n : n + t] = v
        self._lengths[layer] = n + t
        return keys[:, :, : n + t], values[:, :, : n + t]


class SelfAttention(nn.Module):
    """Multi-head self-attention; the position encoding is passed in at call time."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.causal, self.impl = config.causal, config.attn_impl
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(
        self,
        x: Tensor,
        encoding: PositionEncoding,
        positions: Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, H, T, Dh)
        extra = encoding.input_keys(x) if "input_keys" in encoding.hooks else None  # (B, H, T, Dk)
        rotated = False
        if cache is not None:
            if "rotate" in encoding.hooks:  # cache rotated keys: each key is rotated once
                q, k = encoding.rotate(q, k, positions, positions)
                rotated = True
            if extra is None:
                k, v = cache.append(layer, k, v)  # (B, H, S, Dh)
            else:  # the encoding's extra keys ride in the key cache, after the key channels
                both, v = cache.append(layer, torch.cat((k, extra.to(k.dtype)), dim=-1), v)
                k, extra = both.split((self.head_dim, extra.shape[-1]), dim=-1)
        y = attend(
            q,
            k,
            v,
            encoding if encoding.hooks - {"embed"} else None,  # embed-only: applied to the input
            causal=self.causal,
            positions=positions,
            impl=self.impl,
            rotated=rotated,
            extra_keys=extra,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Attention and MLP sublayers with residuals, pre-LN or post-LN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d_ff = config.d_ff or 4 * config.d_model
        self.pre_norm = config.norm == "pre"
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, d_ff), nn.GELU(), nn.Linear(d_ff, config.d_model))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, encoding: PositionEncoding, positions: Tensor, cache=None, layer=0):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), encoding, positions, cache, layer))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, encoding, positions, cache, layer)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    """Token embedding, position encoding(s), blocks, final norm and output head.

    ``forward(idx)`` maps token ids (B, T) to logits (B, T, n_outputs). With a ``KVCache`` (decoders
    only) the new tokens are placed after the cached ones and the cache is extended in place.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()
        self.head = nn.Linear(config.d_model, config.output_size, bias=False)
        self.apply(_init_weights)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            for proj in (block.attn.out, block.mlp[-1]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # Encodings are built after the init above, so their own initialisations stand.
        first = config.build_encoding()
        shared = first.shared_across_layers if config.share_encoding is None else config.share_encoding
        rest = [] if shared else [config.build_encoding() for _ in range(config.n_layers - 1)]
        self.encodings = nn.ModuleList([first, *rest])

    def encoding(self, layer: int) -> PositionEncoding:
        return self.encodings[0 if len(self.encodings) == 1 else layer]

    def forward(self, idx: Tensor, *, cache: KVCache | None = None) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (B, T), got {tuple(idx.shape)}")
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal (decoder) model")
        offset = 0 if cache is None else cache.length
        if offset and any(e.key_lookahead for e in self.encodings):
            raise ValueError(
                f"encoding {self.config.encoding!r} reads keys after each query (e.g. dape "
                "v2_mask='input'), so cached decoding cannot equal the full forward; decode without a cache"
            )
        positions = torch.arange(offset, offset + idx.shape[1], device=idx.device)
        x = self.encodings[0].embed(self.embed(idx), positions)  # (B, T, D)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, self.encoding(layer), positions, cache, layer)
        return self.head(self.norm(x))  # (B, T, n_outputs)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.n_layers)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DecoderLM(Transformer):
    """Causal language model: ``forward(idx)`` gives next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        if not config.causal:
            raise ValueError("DecoderLM needs a causal config (causal=True)")
        super().__init__(config)

    def loss(self, idx: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over the positions where ``mask`` (B, T) is True (all if None)."""
        return masked_cross_entropy(self(idx), targets, mask)

    def generate(
        self, prompt: Tensor, n_new: int, *, temperature: float = 0.0, use_cache: bool = True
    ) -> Tensor:
        """Extend ``prompt`` (B, T) by ``n_new`` tokens: greedy when temperature is 0, else sampled.

        With ``use_cache`` each step feeds only the new token and reuses cached keys and values;
        without it each step recomputes the full forward (the reference the cache is tested against).
        """
        if n_new < 0 or temperature < 0:
            raise ValueError(f"generate needs n_new >= 0 and temperature >= 0, got {n_new}, {temperature}")
        # inference_mode is lighter than no_grad (no view or version tracking: 10-30% per decoding
        # step); the clone outside it returns an ordinary tensor that autograd may use later.
        with torch.inference_mode():
            out = self._generate(prompt, n_new, temperature, use_cache)
        return out.clone()

    def _generate(self, prompt: Tensor, n_new: int, temperature: float, use_cache: bool) -> Tensor:
        cache = self.new_cache() if use_cache else None
        out, step_input = prompt, prompt
        for _ in range(n_new):
            logits = self(step_input, cache=cache)[:, -1] if use_cache else self(out)[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
            out = torch.cat((out, nxt), dim=1)
            step_input = nxt
        return out


class Encoder(Transformer):
    """Bidirectional encoder with a token head: logits (B, T, n_outputs) at every position.

    For the Chomsky-hierarchy tasks the answer is read from placeholder positions appended to the
    input; a classification is the one-placeholder case.
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.causal:
            raise ValueError("Encoder needs a bidirectional config (causal=False)")
        super().__init__(config)


def build_model(config: ModelConfig) -> Transformer:
    """A DecoderLM for a causal config, an Encoder otherwise."""
    return DecoderLM(config) if config.causal else Encoder(config)


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) over mask (B, T)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return loss.mean()
    mask = mask.flatten().to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
