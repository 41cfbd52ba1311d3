"""Position encodings, one file per method, registered by name (see ``base`` for the hooks)."""

from poslab.encodings import (  # noqa: F401  (importing a module registers its encodings)
    alibi,
    cope,
    dape,
    fire,
    fox,
    kerple,
    learned,
    nope,
    pope,
    relative,
    rope,
    sandwich,
    selective,
    sinusoidal,
    stickbreaking,
    t5,
)
from poslab.encodings.base import (
    HOOKS,
    PositionEncoding,
    build_encoding,
    encoding_class,
    encoding_options,
    list_encodings,
    parse_spec,
    register,
)
from poslab.encodings.compose import Composite

__all__ = [
    "HOOKS",
    "Composite",
    "PositionEncoding",
    "build_encoding",
    "encoding_class",
    "encoding_options",
    "list_encodings",
    "parse_spec",
    "register",
]
