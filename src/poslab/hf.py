"""poslab position encodings inside Hugging Face transformers decoders (Llama, Qwen2, Mistral).

    model = transformers.LlamaForCausalLM(config)
    poslab.hf.apply(model, "dape[base=kerple_log]")   # in place; returns the model

`apply` gives every attention layer its own encoding as a submodule (``self_attn.position_encoding``:
trained, saved and loaded with the model), registers poslab's attention with transformers'
``AttentionInterface`` under the name ``"poslab"`` and switches the model to it, so each layer's
attention runs through `poslab.attend` (fused kernels, query blocks, bounded memory). The attention
function receives the attention module, which is how it finds the layer's encoding.

Encodings that read the attention layer's input (FoX's forget gates, CoPE's ``sep_key``; the
``input_keys`` hook) get it from a forward pre-hook on each attention module, which stores
``input_keys(hidden_states)`` on the module for the attention function (selective attention's extra
keys are the queries themselves); during generation the module keeps those of the earlier tokens
itself (transformers' cache holds keys and values only), so decoding
must go forward one sequence at a time from its prompt (greedy or sampled generation: yes; beam search,
which reorders the cache, is not supported for these encodings).

RoPE: the model's own rotary embedding stays on when the spec names ``rope`` (``"rope"``,
``"cope+rope"``): it rotates q and k before the attention function (with the model config's
``rope_theta`` / ``rope_scaling``) and poslab applies the other parts. Otherwise it is replaced by
`NoRotary`, which returns cos = 1 and sin = 0, so the model's ``apply_rotary_pos_emb`` is the
identity; that is one module swap and keeps every model's attention forward untouched.

The spec is recorded in ``model.config.poslab_encoding`` and so saved with ``save_pretrained``;
`from_pretrained` rebuilds the model from its config, applies the recorded spec and loads the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "poslab.hf needs Hugging Face transformers: pip install 'poslab[hf]' (or pip install transformers)"
    ) from error

from poslab.attention import IMPLS, attend
from poslab.encodings.base import (
    PositionEncoding,
    build_encoding,
    encoding_class,
    encoding_options,
    parse_spec,
)

ATTENTION_NAME = "poslab"
CONFIG_KEY = "poslab_encoding"
MODEL_TYPES = ("llama", "qwen2", "mistral")


def apply(model: nn.Module, spec: str, *, impl: str = "auto", **options: Any) -> nn.Module:
    """Put the encoding ``spec`` into a Llama-family decoder, in place, and return the model.

    Args:
        model: a transformers ``LlamaForCausalLM`` / ``LlamaModel`` (or the Qwen2 / Mistral ones).
        spec: any encoding `poslab.build_encoding` accepts: a registry name, a composition
            (``"cope+rope"``) or a spec with options (``"dape[base=kerple_log]"``).
        impl: `poslab.attend`'s path ('auto', 'fused', 'triton' or 'eager').
        **options: encoding options, as for `poslab.build_encoding`.

    Raises:
        ValueError (one line): an unsupported model, an option the bridge cannot honour (attention
        dropout, a non-standard attention scale, RoPE options in the spec), an embedding-level
        encoding (``learned``, ``sinusoidal``), an unknown encoding or option, or a model that
        already carries a poslab encoding.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"poslab.hf supports Llama-family decoders ({', '.join(MODEL_TYPES)}), "
            f"not {type(model).__name__} (model_type {model_type!r})"
        )
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    decoder = model.model if hasattr(model, "model") else model
    layers = list(decoder.layers)
    if any(hasattr(layer.self_attn, "position_encoding") for layer in layers):
        raise ValueError("this model already carries a poslab encoding; apply to a fresh model")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"attention_dropout={config.attention_dropout} is not supported (poslab.attend has no "
            "dropout); set config.attention_dropout = 0"
        )
    try:
        json.dumps({"spec": spec, "options": options})
    except TypeError as error:
        raise ValueError(f"encoding options must be JSON values to be saved in the config: {error}") from None

    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    for layer in layers:
        if not math.isclose(layer.self_attn.scaling, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"attention scale {layer.self_attn.scaling} is not 1/sqrt(head_dim); poslab.attend "
                "scales by 1/sqrt(head_dim) only"
            )
    model_rope, rest, rest_options = split_rope(spec, options)
    # Everything is checked and built before the model is touched: a refused spec leaves it as it was.
    encodings = [build_layer_encoding(rest, rest_options, n_heads, head_dim) for _ in layers]
    # The encoding's parameters (DAPE's MLP, CoPE's table) follow the model's: a bfloat16 model on a
    # GPU gets a bfloat16 encoding there, or DAPE refuses its queries' dtype at the first forward.
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if reference is not None:
        for encoding in encodings:
            if encoding is not None:
                encoding.to(device=reference.device, dtype=reference.dtype)
    if impl == "fused" and encodings[0] is not None:
        if encodings[0].uses_logits:
            raise ValueError(f"encoding {encodings[0].name!r} rewrites logits; impl='fused' cannot run it")
        if encodings[0].replaces_softmax:
            raise ValueError(
                f"encoding {encodings[0].name!r} replaces the softmax; impl='fused' cannot run it"
            )
    for layer, encoding in zip(layers, encodings, strict=True):
        attn = layer.self_attn
        attn.position_encoding = encoding
        attn.poslab_impl = impl
        attn.poslab_model_rope = model_rope
        if encoding is not None and "input_keys" in encoding.hooks and not encoding.queries_as_extra_keys:
            attn.register_forward_pre_hook(keep_layer_input, with_kwargs=True)
    if not model_rope:
        decoder.rotary_emb = NoRotary(head_dim)

    AttentionInterface.register(ATTENTION_NAME, poslab_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    setattr(config, CONFIG_KEY, {"spec": spec, "options": options, "impl": impl})
    return model


def split_rope(spec: str, options: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
    """(does the spec name rope, the spec of its other parts or None, their options).

    The model's rotary embedding does RoPE, configured by the model config; RoPE options in the spec
    would silently differ from it, so they are refused.
    """
    name, spec_options = parse_spec(spec)
    all_options = {**spec_options, **options}
    parts = name.split("+")
    if "rope" not in parts:
        return False, spec, options
    rope_keys = set(encoding_options(encoding_class("rope")))
    given = set(all_options) if parts == ["rope"] else set(all_options.get("rope") or {})
    given |= rope_keys & set(all_options)
    if given:
        raise ValueError(
            f"the model's own rotary embedding does RoPE: set {', '.join(sorted(given))} in the model "
            "config (rope_theta, rope_scaling), not in the spec"
        )
    rest = [p for p in parts if p != "rope"]
    if not rest:
        return True, None, {}
    all_options.pop("rope", None)
    return True, "+".join(rest), all_options


def build_layer_encoding(
    spec: str | None, options: dict[str, Any], n_heads: int, head_dim: int
) -> PositionEncoding | None:
    """One layer's encoding (None when RoPE alone is asked for); embedding-level encodings refused."""
    if spec is None:
        return None
    encoding = build_encoding(spec, n_heads=n_heads, head_dim=head_dim, causal=True, **options)
    if "embed" in encoding.hooks:
        raise ValueError(
            f"encoding {encoding.name!r} acts on token embeddings (embed hook); poslab.hf supports "
            "encodings that act inside attention (rotate, bias, logits) only"
        )
    if not encoding.supports_causal:
        raise ValueError(f"encoding {encoding.name!r} is not defined for causal attention")
    return encoding


def keep_layer_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of an attention module: what its encoding's ``input_keys`` makes of the layer
    input (B, T, D), kept on the module for `poslab_attention` (the attention interface gets q, k, v
    only)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    module.poslab_new_keys = module.position_encoding.input_keys(x)  # (B, H, T, Dk)


def layer_extra_keys(module: nn.Module, query: Tensor, n_keys: int) -> Tensor:
    """The encoding's extra keys (B, H, S, Dk) of every key: those of this call's T tokens (from the
    pre-hook, or the queries themselves) after those kept from the earlier calls of one generation (a
    call with T == S starts a new sequence)."""
    n_queries = query.shape[2]
    if module.position_encoding.queries_as_extra_keys:
        new = query
    else:
        new = module.__dict__.pop("poslab_new_keys", None)
    if new is None or new.shape[2] != n_queries:
        raise ValueError("poslab.hf: the attention layer's input was not seen (its pre-hook did not run)")
    earlier = getattr(module, "poslab_past_keys", None)
    if n_keys == n_queries:
        extra = new
    elif earlier is not None and earlier.shape[2] == n_keys - n_queries and earlier.shape[0] == new.shape[0]:
        extra = torch.cat((earlier.to(new.dtype), new), dim=2)
    else:
        raise ValueError(
            f"poslab.hf: encoding {module.position_encoding.name!r} reads the layer input of every cached "
            "token and keeps it itself: decode one sequence at a time from its prompt (no beam search, no "
            "cache built elsewhere)"
        )
    module.poslab_past_keys = extra.detach()
    return extra


class NoRotary(nn.Module):
    """Stands in for the model's rotary embedding: cos = 1, sin = 0, so q and k pass unrotated."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (B, T, Dh) for hidden states ``x`` (B, T, D) at ``position_ids`` (B, T)."""
        shape = (*position_ids.shape, self.head_dim)
        return x.new_ones(shape), x.new_zeros(shape)


def poslab_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: `poslab.attend` with the layer's own encoding.

    query (B, H, T, Dh), key and value (B, Hkv, S, Dh), the T queries being the last T of the S keys
    (a full forward, or one step with the model's dynamic KV cache). ``attention_mask`` is None or a
    boolean (B, 1, T, S) mask that must be causal with key padding (left padding in generation,
    right padding in training); each row then runs with its own positions, counted from its first
    real token, exactly as if it were alone. A padding-free packed batch (position_ids restarting
    at each document, `packed_documents`) runs each document alone, at positions from 0.
    Returns ((B, T, H, Dv) outputs, None).
    """
    if dropout:
        raise ValueError("poslab.hf: attention dropout is not supported; set config.attention_dropout = 0")
    encoding = module.position_encoding
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    n_queries, n_keys = query.shape[2], key.shape[2]
    impl = module.poslab_impl
    extra = None
    if encoding is not None and "input_keys" in encoding.hooks:
        extra = layer_extra_keys(module, query, n_keys)
    documents = packed_documents(
        kwargs.get("position_ids"), attention_mask, query.shape[0], n_queries, n_keys
    )
    if documents is not None:  # padding-free packing: each document attends to itself alone
        out = attend(query, key, value, encoding, impl=impl, document_ids=documents, extra_keys=extra)
        return out.transpose(1, 2).contiguous(), None
    starts = padding_starts(attention_mask, n_queries, n_keys)
    if starts is None:
        out = attend(query, key, value, encoding, impl=impl, extra_keys=extra)
        return out.transpose(1, 2).contiguous(), None
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=query.device)
    if module.poslab_model_rope and encoding is not None:
        check_rotary_positions(kwargs.get("position_ids"), starts, q_pos)
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    for start in starts.unique().tolist():
        rows = (starts == start).nonzero().flatten()
        first = max(0, start - (n_keys - n_queries))  # the first query at or after the row's start
        if first >= n_queries:
            continue  # only padding queries: their outputs stay 0
        out[rows, :, first:] = attend(
            query[rows, :, first:],
            key[rows, :, start:],
            value[rows, :, start:],
            encoding,
            positions=q_pos[first:] - start,
            impl=impl,
            extra_keys=None if extra is None else extra[rows, :, start:],
        )
    return out.transpose(1, 2).contiguous(), None


def packed_documents(
    position_ids: Tensor | None, mask: Tensor | None, batch: int, n_queries: int, n_keys: int
) -> Tensor | None:
    """Document ids (B, T) of a padding-free packed batch, or None when the batch is not packed.

    A packed batch (transformers' ``DataCollatorWithFlattening``) has no padding and position_ids
    that restart at each document; a new document starts wherever the position does not grow by 1,
    as transformers' ``find_packed_sequence_indices`` reads them. Only a full forward (T == S) can
    be packed. transformers' mask is then None (it skips packing detection when a cache is passed,
    as a plain forward does) or causal within each document, which is checked; any other mask (left
    padding, whose position_ids also jump) is not packing.
    """
    if position_ids is None or n_queries != n_keys or n_queries < 2:
        return None
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (step != 1).cumsum(-1)
    if not bool((documents[:, -1] > 0).any()):
        return None  # one document per row: not packed
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask == 0  # a float mask: 0 where visible, -inf where masked
        index = torch.arange(n_keys, device=mask.device)
        documents = documents.to(mask.device)
        packed = (index[None, :] <= index[:, None]) & (documents[:, :, None] == documents[:, None, :])
        if mask.dim() != 4 or mask.shape[-2:] != (n_queries, n_keys) or not torch.equal(mask[:, 0], packed):
            return None
    return documents


def check_rotary_positions(position_ids: Tensor | None, starts: Tensor, q_pos: Tensor) -> None:
    """With left padding, the model's rotary embedding must count each row from its first real token.

    RoPE alone only sees position differences, but a poslab part composed with it (CoPE's position
    logits read the rotated queries) would see the padding offset. ``generate`` passes such
    position_ids itself; a plain forward must be given them.
    """
    expected = q_pos[None, :] - starts[:, None]  # (B, T)
    real = expected >= 0
    if position_ids is None or not torch.equal(position_ids.expand_as(expected)[real], expected[real]):
        raise ValueError(
            "poslab.hf: with left padding and the model's rotary embedding, pass position_ids that count "
            "each row from its first real token (attention_mask.cumsum(-1) - 1, as generate does)"
        )


STATIC_CACHE = (
    "poslab.hf: the queries are not the last of the keys (a static cache?); use the default dynamic cache"
)


def padding_starts(mask: Tensor | None, n_queries: int, n_keys: int) -> Tensor | None:
    """Index of each row's first real key (B,), or None when no row is left-padded.

    ValueError unless ``mask`` is exactly causal with key padding that is a prefix (left) or a suffix
    (right) of the row: any other mask (sliding window, packed sequences, a static cache, padding
    inside a row) would need positions poslab.attend cannot express.
    """
    if mask is None:
        if 1 < n_queries < n_keys:  # None then means SDPA's top-left causal mask: a static cache
            raise ValueError(STATIC_CACHE)
        return None
    if mask.dtype != torch.bool:
        mask = mask == 0  # a float mask: 0 where visible, -inf where masked
    if mask.dim() != 4 or mask.shape[-2:] != (n_queries, n_keys):
        raise ValueError(f"poslab.hf: unexpected attention mask of shape {tuple(mask.shape)}")
    mask = mask[:, 0]  # (B, T, S)
    valid = mask.any(dim=1)  # (B, S): keys some query sees
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=mask.device)
    causal = torch.arange(n_keys, device=mask.device)[None, :] <= q_pos[:, None]  # (T, S)
    index = torch.arange(n_keys, device=mask.device)
    starts = torch.where(valid, index, n_keys).min(dim=1).values
    stops = torch.where(valid, index + 1, 0).max(dim=1).values
    contiguous = (valid.sum(dim=1) == (stops - starts).clamp(min=0)).all()
    if not contiguous or not torch.equal(mask, causal[None] & valid[:, None, :]):
        raise ValueError(
            "poslab.hf: the attention mask is not causal with left or right padding (padding inside a "
            "row, sliding window, packed sequences or a static cache?); poslab.attend cannot honour it"
        )
    if bool((valid.any(dim=1) & (stops <= n_keys - n_queries)).any()):
        raise ValueError(STATIC_CACHE)  # no query is a real token: keys past the last one are empty slots
    if not bool((starts > 0).any()):
        return None  # right padding at most: real queries never see the padding after them
    return starts


def from_pretrained(path: str | Path, **config_overrides: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after `apply`, with the spec its config records.

    Builds the model from its config (``AutoModelForCausalLM.from_config``), applies the recorded
    spec and loads the safetensors weights (one file or an index of shards); ValueError if the
    config records no spec or a weight is missing or unexpected.
    """
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path, **config_overrides)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(
            f"{path}/config.json records no {CONFIG_KEY}; was the model saved after poslab.hf.apply?"
        )
    model = transformers.AutoModelForCausalLM.from_config(config)
    apply(model, record["spec"], impl=record.get("impl", "auto"), **record.get("options", {}))
    load_weights(model, path)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the safetensors weights in ``path`` into ``model`` strictly (tied copies excepted)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} holds no model.safetensors (or its index)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    result = model.load_state_dict(state, strict=False)
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights in {path} do not match the model: missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}"
        )
