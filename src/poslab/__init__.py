"""poslab: position encodings for transformers (CoPE, DAPE and every baseline they build on)."""

from poslab.allocator import tune_allocator
from poslab.attention import attend
from poslab.encodings import (
    PositionEncoding,
    build_encoding,
    list_encodings,
    parse_spec,
    register,
)
from poslab.model import DecoderLM, Encoder, KVCache, ModelConfig, build_model

__version__ = "0.1.0"

__all__ = [
    "DecoderLM",
    "Encoder",
    "KVCache",
    "ModelConfig",
    "PositionEncoding",
    "attend",
    "build_encoding",
    "build_model",
    "list_encodings",
    "parse_spec",
    "register",
    "tune_allocator",
]
