"""A reader for R's serialization format and its lazy-load databases (.rds, .rdb/.rdx).

Enough of R's ``serialize()`` format (R Internals, section 1.8 "Serialization Formats"; R's
src/main/serialize.c) to read data sets shipped in R packages without R: the XDR (big-endian binary)
format, versions 2 and 3, with every SEXP type that plain data can hold (NULL, pairlists with tags
and attributes, symbols, references, character vectors with their encodings and NA, logical,
integer, double, complex and raw vectors, lists, environments, S4 objects, ALTREP compact sequences,
deferred strings and wrappers) plus closures, language objects and byte code, so that a package's
own lazy-load database of functions parses too.

A lazy-load database is two files. ``NAME.rdx`` is a compressed serialization (gzip, as ``saveRDS``
writes it) of a list with ``variables`` and ``references`` (name -> an integer vector of byte offset
and length into ``NAME.rdb``) and ``compressed`` (how the records are compressed). Each record in
``NAME.rdb`` is a 4-byte big-endian uncompressed length followed by a zlib stream (with
``compressed = 2`` or ``3`` a type byte follows the length: '1' zlib, '2' bzip2, 'Z' xz, '0' none).

    db = LazyLoadDB("/usr/lib/R/site-library/janeaustenr/data/Rdata")
    emma = db["emma"]            # RObject(type='character', value=['EMMA', '', ...])

Values come back as `RObject` (the R type name, a Python value, the attributes); `to_python` turns
plain data into Python lists and dicts.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LazyLoadDB",
    "RDataError",
    "RObject",
    "read_rds",
    "to_python",
    "unserialize",
]


class RDataError(ValueError):
    """Bytes this reader cannot read as an R serialization (corrupt, or an unsupported form)."""


@dataclass
class RObject:
    """One R value.

    type: R's ``typeof()`` name: "NULL", "character", "integer", "double", "logical", "complex",
        "raw", "list", "pairlist", "language", "symbol", "environment", "closure", "S4", ...
    value: the payload. Vectors: a Python list, with None for NA ("raw": bytes). Character vectors
        hold str (or bytes for strings marked "bytes"). "list": a list of RObject. "pairlist" and
        "language": a list of (tag or None, RObject). "symbol": the name. "environment": a dict with
        "bindings" (name -> RObject), "enclos" and "locked", or the name of a special environment
        (e.g. "R_GlobalEnv").
    attributes: attribute name -> RObject (e.g. "names", "class", "dim").
    """

    type: str
    value: Any = None
    attributes: dict[str, RObject] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a list of strings, or None when there is none."""
        names = self.attributes.get("names")
        return None if names is None else list(names.value)

    @property
    def classes(self) -> list[str]:
        """The ``class`` attribute (empty when there is none)."""
        cls = self.attributes.get("class")
        return [] if cls is None else list(cls.value)

    def __len__(self) -> int:
        return 0 if self.value is None else len(self.value)


NULL = RObject("NULL")

# SEXP type codes (Rinternals.h) and the pseudo-types that only occur in serializations.
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP = 7, 8, 9, 10, 13, 14
_CPLXSXP, _STRSXP, _DOTSXP, _VECSXP, _EXPRSXP, _BCODESXP = 15, 16, 17, 19, 20, 21
_EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = 22, 23, 24, 25
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP = 255, 254, 253, 252
_MISSINGARG_SXP, _BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP = 251, 250, 249, 248
_PERSISTSXP, _CLASSREFSXP, _GENERICREFSXP, _BCREPDEF = 247, 246, 245, 244
_BCREPREF, _EMPTYENV_SXP, _BASEENV_SXP = 243, 242, 241
_ATTRLANGSXP, _ATTRLISTSXP, _ALTREP_SXP = 240, 239, 238

_PAIRLIST_TYPES = {
    _LISTSXP: "pairlist",
    _LANGSXP: "language",
    _DOTSXP: "...",
    _ATTRLISTSXP: "pairlist",
    _ATTRLANGSXP: "language",
}
_SPECIAL_VALUES = {
    _NILVALUE_SXP: NULL,
    _GLOBALENV_SXP: RObject("environment", "R_GlobalEnv"),
    _EMPTYENV_SXP: RObject("environment", "R_EmptyEnv"),
    _BASEENV_SXP: RObject("environment", "base"),
    _BASENAMESPACE_SXP: RObject("environment", "namespace:base"),
    _UNBOUNDVALUE_SXP: RObject("unbound"),
    _MISSINGARG_SXP: RObject("missing"),
}

# Flags of a CHARSXP's "levels" field: how the string's bytes are encoded.
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

_NA_INTEGER = -(2**31)
_NA_REAL_LOW_WORD = 1954  # R's NA_real_ is the NaN whose low 32-bit word is 1954


class _Reader:
    """One pass over an XDR serialization; ``refs`` is the reference table of SerializeInit."""

    def __init__(self, data: bytes, persistent_load: Callable[[list[str]], RObject] | None) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.refs: list[RObject] = []
        self.persistent_load = persistent_load
        self.native_encoding = "utf-8"

    # -- primitives ---------------------------------------------------------------------------

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(
                f"truncated R serialization: needed {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        if n < 0:
            raise RDataError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    # -- header and items ---------------------------------------------------------------------

    def header(self) -> None:
        fmt = bytes(self.take(2))
        if fmt != b"X\n":
            kinds = {b"A\n": "ascii", b"B\n": "native binary"}
            if fmt in kinds:
                raise RDataError(
                    f"only R's XDR binary serialization is supported, got the {kinds[fmt]} format"
                )
            raise RDataError(f"not an R serialization (starts with {fmt!r})")
        version = self.int()
        self.int()  # version of R that wrote it
        self.int()  # oldest R version that can read it
        if version == 3:
            self.native_encoding = _python_encoding(bytes(self.take(self.int())).decode("ascii"))
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version} (2 and 3 are)")

    def item(self, flags: int | None = None) -> RObject:
        if flags is None:
            flags = self.int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype in _SPECIAL_VALUES:
            return _SPECIAL_VALUES[sexptype]
        if sexptype == _REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"reference {index} to an object not read yet")
            return self.refs[index - 1]
        if sexptype == _PERSISTSXP:
            names = self.string_vector()
            obj = (
                self.persistent_load(names)
                if self.persistent_load is not None
                else RObject("persistent", names)
            )
            self.refs.append(obj)
            return obj
        if sexptype == _SYMSXP:
            obj = RObject("symbol", self.item().value)
            self.refs.append(obj)
            return obj
        if sexptype in (_PACKAGESXP, _NAMESPACESXP):
            kind = "package" if sexptype == _PACKAGESXP else "namespace"
            obj = RObject("environment", f"{kind}:{':'.join(map(str, self.string_vector()))}")
            self.refs.append(obj)
            return obj
        if sexptype == _ENVSXP:
            return self.environment()
        if sexptype in _PAIRLIST_TYPES:
            return self.pairlist(sexptype, has_attr, has_tag)
        if sexptype in (_CLOSXP, _PROMSXP):
            attributes = self.attributes() if has_attr else {}
            tag = self.item() if has_tag else NULL
            car, cdr = self.item(), self.item()
            if sexptype == _CLOSXP:
                value = {"formals": car, "body": cdr, "environment": tag}
                return RObject("closure", value, attributes)
            return RObject("promise", {"value": car, "code": cdr, "environment": tag}, attributes)
        if sexptype == _ALTREP_SXP:
            return self.altrep()
        if sexptype in (_CLASSREFSXP, _GENERICREFSXP):
            raise RDataError(f"this reader does not support SEXP type {sexptype}")

        obj = self.vector_like(sexptype, levels)
        if sexptype == _CHARSXP:
            if has_attr:  # only old writers put attributes on strings; R ignores them too
                self.item()
        elif has_attr:
            obj.attributes = _attributes(self.item())
        return obj

    def vector_like(self, sexptype: int, levels: int) -> RObject:
        if sexptype == _CHARSXP:
            return RObject("char", self.charsxp(levels))
        if sexptype == _LGLSXP:
            ints = self.int_array(self.length())
            return RObject("logical", [None if v == _NA_INTEGER else bool(v) for v in ints])
        if sexptype == _INTSXP:
            ints = self.int_array(self.length())
            return RObject("integer", [None if v == _NA_INTEGER else v for v in ints])
        if sexptype == _REALSXP:
            return RObject("double", self.doubles(self.length()))
        if sexptype == _CPLXSXP:
            parts = self.doubles(2 * self.length())
            values = [
                None if re is None or im is None else complex(re, im)
                for re, im in zip(parts[::2], parts[1::2], strict=True)
            ]
            return RObject("complex", values)
        if sexptype == _STRSXP:
            n = self.length()
            return RObject("character", [self.item().value for _ in range(n)])
        if sexptype in (_VECSXP, _EXPRSXP):
            n = self.length()
            kind = "list" if sexptype == _VECSXP else "expression"
            return RObject(kind, [self.item() for _ in range(n)])
        if sexptype == _RAWSXP:
            return RObject("raw", bytes(self.take(self.length())))
        if sexptype == _S4SXP:
            return RObject("S4")
        if sexptype in (_SPECIALSXP, _BUILTINSXP):
            name = bytes(self.take(self.int())).decode("ascii")
            return RObject("special" if sexptype == _SPECIALSXP else "builtin", name)
        if sexptype == _EXTPTRSXP:
            obj = RObject("externalptr")
            self.refs.append(obj)
            obj.value = {"protected": self.item(), "tag": self.item()}
            return obj
        if sexptype == _WEAKREFSXP:
            obj = RObject("weakref")
            self.refs.append(obj)
            return obj
        if sexptype == _BCODESXP:
            return self.bytecode()
        raise RDataError(f"unknown SEXP type {sexptype} at offset {self.pos - 4}")

    def charsxp(self, levels: int) -> str | bytes | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = bytes(self.take(n))
        if levels & _UTF8_MASK:
            return raw.decode("utf-8", errors="replace")
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            return raw
        if levels & _ASCII_MASK:
            return raw.decode("ascii", errors="replace")
        # No declared encoding: the bytes are in the writer's native encoding.
        return raw.decode(self.native_encoding, errors="replace")

    def int_array(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self.take(4 * n))

    def doubles(self, n: int) -> list[float | None]:
        raw = self.take(8 * n)
        values: list[float | None] = list(struct.unpack(f">{n}d", raw))
        for i, v in enumerate(values):
            if v is not None and math.isnan(v):
                low_word = struct.unpack_from(">I", raw, 8 * i + 4)[0]
                if low_word == _NA_REAL_LOW_WORD:
                    values[i] = None
        return values

    def string_vector(self) -> list[str]:
        """InStringVec: a 0, a length, then that many CHARSXP items (package and persist names)."""
        if self.int() != 0:
            raise RDataError("names vectors with attributes are not supported")
        return [self.item().value for _ in range(self.length())]

    def attributes(self) -> dict[str, RObject]:
        return _attributes(self.item())

    def pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        """A chain of cons cells read iteratively (a long pairlist would overflow the stack)."""
        obj = RObject(_PAIRLIST_TYPES[sexptype], [])
        first = True
        while True:
            attributes = self.attributes() if has_attr else {}
            if first:
                obj.attributes, first = attributes, False
            tag = _tag_name(self.item()) if has_tag else None
            obj.value.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF not in (_LISTSXP, _LANGSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP):
                tail = self.item(flags)
                if tail is not NULL:  # a dotted pair: keep the final cdr as a last, untagged item
                    obj.value.append((None, tail))
                return obj
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def environment(self) -> RObject:
        locked = self.int()
        obj = RObject("environment", {})
        self.refs.append(obj)  # before the contents, which may refer back to it
        enclos, frame, hashtab = self.item(), self.item(), self.item()
        attributes = self.attributes()
        bindings: dict[str, RObject] = {}
        chains = [frame] + (list(hashtab.value) if hashtab.type == "list" else [])
        for chain in chains:
            if chain.type == "pairlist":
                bindings.update((tag, value) for tag, value in chain.value if tag is not None)
        obj.value = {"bindings": bindings, "enclos": enclos, "locked": bool(locked)}
        obj.attributes = attributes
        return obj

    def altrep(self) -> RObject:
        info, state, attributes = self.item(), self.item(), self.attributes()
        if info.type != "pairlist" or not info.value:
            raise RDataError("malformed ALTREP class information")
        cls = info.value[0][1].value
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value[:3]
            if cls == "compact_intseq":
                obj = RObject("integer", [int(start + i * step) for i in range(int(n))])
            else:
                obj = RObject("double", [start + i * step for i in range(int(n))])
        elif cls == "deferred_string":
            # state: the number vector to convert (a dotted pair with its scipen setting)
            numbers = state.value[0][1] if state.type == "pairlist" else state
            obj = RObject("character", [_number_to_string(v) for v in numbers.value])
        elif cls.startswith("wrap_"):
            wrapped = state.value[0][1]  # state: (wrapped vector . metadata)
            obj = RObject(wrapped.type, wrapped.value)
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r}")
        obj.attributes = attributes
        return obj

    # -- byte code (closures compiled by R's compiler package) ---------------------------------

    def bytecode(self) -> RObject:
        reps: list[RObject | None] = [None] * self.int()
        return self.bytecode1(reps)

    def bytecode1(self, reps: list[RObject | None]) -> RObject:
        code = self.item()
        consts = []
        for _ in range(self.int()):
            kind = self.int()
            if kind == _BCODESXP:
                consts.append(self.bytecode1(reps))
            elif kind in (_LANGSXP, _LISTSXP, _BCREPDEF, _BCREPREF, _ATTRLANGSXP, _ATTRLISTSXP):
                consts.append(self.bytecode_lang(kind, reps))
            else:
                consts.append(self.item())
        return RObject("bytecode", {"code": code, "consts": consts})

    def bytecode_lang(self, kind: int, reps: list[RObject | None]) -> RObject:
        if kind == _BCREPREF:
            index = self.int()
            shared = reps[index] if 0 <= index < len(reps) else None
            if shared is None:
                raise RDataError(f"byte code refers to cell {index}, which it has not defined")
            return shared
        if kind not in (_BCREPDEF, _LANGSXP, _LISTSXP, _ATTRLANGSXP, _ATTRLISTSXP):
            return self.item()
        position = -1
        if kind == _BCREPDEF:
            position = self.int()
            kind = self.int()
        obj = RObject(_PAIRLIST_TYPES.get(kind, "pairlist"), [])
        if position >= 0:
            reps[position] = obj
        if kind in (_ATTRLANGSXP, _ATTRLISTSXP):
            obj.attributes = self.attributes()
        tag = _tag_name(self.item())
        car = self.bytecode_lang(self.int(), reps)
        cdr = self.bytecode_lang(self.int(), reps)
        obj.value.append((tag, car))
        if cdr.type in ("pairlist", "language") and cdr is not obj:
            obj.value.extend(cdr.value)
        elif cdr is not NULL:
            obj.value.append((None, cdr))
        return obj


def _attributes(pairlist: RObject) -> dict[str, RObject]:
    if pairlist is NULL:
        return {}
    if pairlist.type != "pairlist":
        raise RDataError(f"attributes must be a pairlist, got {pairlist.type}")
    return {tag: value for tag, value in pairlist.value if tag is not None}


def _tag_name(tag: RObject) -> str | None:
    if tag is NULL:
        return None
    if tag.type == "symbol":
        return tag.value
    raise RDataError(f"a pairlist tag must be a symbol, got {tag.type}")


def _number_to_string(value: float | int | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.15g}"


def _python_encoding(r_encoding: str) -> str:
    """Python's codec for R's name of a native encoding (UTF-8 when Python does not know it)."""
    try:
        return codecs.lookup(r_encoding).name
    except LookupError:
        return "utf-8"


# -- entry points ------------------------------------------------------------------------------


def unserialize(data: bytes, *, persistent_load: Callable[[list[str]], RObject] | None = None) -> RObject:
    """The R object serialized (uncompressed, XDR format) in ``data``, as R's ``unserialize``.

    persistent_load: called with the names of each persistent reference (a lazy-load database
    stores environments that way); by default they come back as RObject("persistent", names).
    """
    reader = _Reader(data, persistent_load)
    reader.header()
    obj = reader.item()
    if reader.pos != len(reader.data):
        raise RDataError(f"{len(reader.data) - reader.pos} bytes left after the R object")
    return obj


def decompress(data: bytes) -> bytes:
    """The bytes of a gzip, bzip2, xz or zlib stream (as ``saveRDS`` writes), or ``data`` as is."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        if data[:1] == b"\x78":
            return zlib.decompress(data)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
        raise RDataError(f"corrupt compressed R data: {err}") from err
    return data


def read_rds(path: str | Path) -> RObject:
    """The object in an ``.rds`` file (as R's ``readRDS``); also reads ``.rdx`` indexes."""
    return unserialize(decompress(Path(path).read_bytes()))


class LazyLoadDB:
    """A lazy-load database (``NAME.rdb`` + ``NAME.rdx``), as R packages store data and functions.

    path: ``NAME``, ``NAME.rdb`` or ``NAME.rdx``. Objects are read from the .rdb when asked for.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".rdb", ".rdx") else path
        self.rdb_path = base.with_name(base.name + ".rdb")
        self.rdx_path = base.with_name(base.name + ".rdx")
        for p in (self.rdb_path, self.rdx_path):
            if not p.is_file():
                raise FileNotFoundError(f"lazy-load database file {p} does not exist")
        index = read_rds(self.rdx_path)
        if index.type != "list" or not index.names:
            raise RDataError(f"{self.rdx_path} is not a lazy-load index (a named list)")
        parts = dict(zip(index.names, index.value, strict=True))
        if "variables" not in parts:
            raise RDataError(f"{self.rdx_path} has no 'variables' entry")
        self.variables = _offsets(parts["variables"])
        self.references = _offsets(parts.get("references", NULL))
        compressed = parts.get("compressed", RObject("logical", [True]))
        self.compression = int(compressed.value[0]) if compressed.value else 1
        self._data: bytes | None = None

    def keys(self) -> list[str]:
        """Names of the objects in the database, in the index's order."""
        return list(self.variables)

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def __iter__(self) -> Iterator[str]:
        return iter(self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, name: str) -> RObject:
        if name not in self.variables:
            raise KeyError(f"{name!r} is not in {self.rdb_path} (it holds {', '.join(self)})")
        return self._fetch(self.variables[name])

    def reference(self, key: str) -> RObject:
        """A stored environment's contents (a list: bindings, enclos, attributes, isS4, locked)."""
        return self._fetch(self.references[key])

    def _fetch(self, where: tuple[int, int]) -> RObject:
        if self._data is None:
            self._data = self.rdb_path.read_bytes()
        offset, length = where
        record = self._data[offset : offset + length]
        if len(record) != length:
            raise RDataError(f"{self.rdb_path} is shorter than its index says")
        return unserialize(_decompress_record(record, self.compression))


def _offsets(obj: RObject) -> dict[str, tuple[int, int]]:
    if obj is NULL or not obj.value:
        return {}
    names = obj.names or []
    return {
        name: (int(entry.value[0]), int(entry.value[1])) for name, entry in zip(names, obj.value, strict=True)
    }


_R_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def _decompress_record(record: bytes, compression: int) -> bytes:
    """R_decompress1/2/3 of src/main/serialize.c."""
    if compression == 0:
        return record
    if len(record) < 5:
        raise RDataError("lazy-load record shorter than its header")
    out_len = struct.unpack(">I", record[:4])[0]
    body, kind = record[4:], b"1"
    if compression in (2, 3):
        kind, body = record[4:5], record[5:]
    try:
        if kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":  # a raw LZMA2 stream with xz's preset 6, as R_compress3 writes
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_R_LZMA_FILTERS)
        elif kind == b"0":
            out = bytes(body)
        else:
            raise RDataError(f"unknown lazy-load record compression {kind!r}")
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
        if isinstance(err, RDataError):
            raise
        raise RDataError(f"corrupt lazy-load record: {err}") from err
    if len(out) != out_len:
        raise RDataError(f"lazy-load record decompressed to {len(out)} bytes, expected {out_len}")
    return out


def to_python(obj: RObject) -> Any:
    """Plain data as Python values: vectors -> lists (a length-1 vector -> its element), named
    vectors and lists -> dicts, NULL -> None. Other objects come back as they are."""
    if obj is NULL:
        return None
    if obj.type in ("character", "integer", "double", "logical", "complex", "list"):
        values = [to_python(v) for v in obj.value] if obj.type == "list" else list(obj.value)
        names = obj.names
        if names is not None:
            return dict(zip(names, values, strict=True))
        return values[0] if len(values) == 1 and obj.type != "list" else values
    if obj.type == "raw":
        return obj.value
    if obj.type == "pairlist":
        return {tag: to_python(value) for tag, value in obj.value}
    return obj
