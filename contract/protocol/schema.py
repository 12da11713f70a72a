"""Typed JSON values that are both checked and documented from one definition.

A wire type is described once, as a tree of `Bool`, `Int`, `Num`, `Str`,
`B64`, `Enum`, `Obj`, `Map`, `Arr` and `Nullable`; `parse(value)` checks a decoded JSON
value against it (raising `ProtocolError` with `missing_field` or
`invalid_field`, and the field's path) and `schema()` writes the JSON Schema
(OpenAPI 3.1) that says the same, limits included. So the server's checks
and its OpenAPI document cannot drift apart, and the phone checks what a
server sends with the same code.

JSON is loose: true is not 1, 1.5 is not an integer, NaN parses in Python.
An integer field accepts a whole-number float (13468.0), as JSON Schema's
"integer" does; a number must be finite. An object takes no key it does not
name (a device cannot slip free text into a field nobody reads), and a map
of device-chosen names takes them from a closed set where it has one. No text
holds U+0000: the server refuses it at the door (server.app), and a string's
schema says so (`NO_NUL`) where its pattern does not already.
"""
from __future__ import annotations

import base64
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from contract.protocol.errors import ErrorCode, ProtocolError

MAX_INT = 2**53   # JSON numbers are exact up to here
NO_NUL = "^[^\\x00]*$"     # the JSON Schema pattern of a string without U+0000


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"'{where}' must be {what}")


class Type:
    """A JSON value's type; subclasses implement `parse` and `_schema`."""

    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> Any:
        raise NotImplementedError

    def _schema(self) -> dict:
        raise NotImplementedError

    def schema(self) -> dict:
        out = self._schema()
        if self.description:
            out["description"] = self.description
        return out


@dataclasses.dataclass
class Bool(Type):
    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> bool:
        if not isinstance(value, bool):
            raise _bad(where, "true or false")
        return value

    def _schema(self) -> dict:
        return {"type": "boolean"}


class _Ranged(Type):
    """A number with optional bounds: the check and the schema of `lo`/`hi`, once."""

    lo: float | None
    hi: float | None
    kind: str = "number"

    def _in_range(self, value, where: str):
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise _bad(where, f"{'an integer' if self.kind == 'integer' else 'a number'} in "
                              f"[{self.lo}, {self.hi}]")
        return value

    def _schema(self) -> dict:
        out: dict = {"type": self.kind}
        if self.lo is not None:
            out["minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


@dataclasses.dataclass
class Int(_Ranged):
    lo: int | None = 0
    hi: int | None = MAX_INT
    description: str | None = None
    kind = "integer"

    def parse(self, value: Any, where: str = "value") -> int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, "an integer")
        return self._in_range(value, where)


@dataclasses.dataclass
class Num(_Ranged):
    lo: float | None = None
    hi: float | None = None
    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(where, "a finite number")
        return float(self._in_range(value, where))


@dataclasses.dataclass
class Str(Type):
    max_len: int = 200
    pattern: str | None = None
    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> str:
        if not isinstance(value, str) or len(value) > self.max_len:
            raise _bad(where, f"a string of at most {self.max_len} characters")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _bad(where, f"a string matching {self.pattern}")
        return value

    def _schema(self) -> dict:
        out: dict = {"type": "string", "maxLength": self.max_len, "pattern": NO_NUL}
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern})$"
        return out


@dataclasses.dataclass
class B64(Type):
    """Exactly `size` bytes, base64url without padding (keys, ciphertexts): parsed to the bytes."""

    size: int
    description: str | None = None

    @property
    def length(self) -> int:
        return (4 * self.size + 2) // 3

    def parse(self, value: Any, where: str = "value") -> bytes:
        if not isinstance(value, str) or len(value) != self.length or not _B64URL.fullmatch(value):
            raise _bad(where, f"{self.size} bytes as {self.length} base64url characters (no padding)")
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    @staticmethod
    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    def _schema(self) -> dict:
        return {"type": "string", "minLength": self.length, "maxLength": self.length,
                "pattern": "^[A-Za-z0-9_-]*$"}


_B64URL = re.compile("[A-Za-z0-9_-]*")


@dataclasses.dataclass
class Enum(Type):
    """One of a few strings (or integers): exactly, so true is not 1 and 8.0 is 8."""

    values: Sequence[str | int]
    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> str | int:
        if isinstance(value, float) and value.is_integer() and int(value) in self.values:
            value = int(value)
        if isinstance(value, bool) or value not in self.values or not isinstance(value, (str, int)):
            raise _bad(where, f"one of {', '.join(map(str, self.values))}")
        return value

    def _schema(self) -> dict:
        kind = "string" if all(isinstance(v, str) for v in self.values) else "integer"
        return {"type": kind, "enum": list(self.values)}


@dataclasses.dataclass
class Nullable(Type):
    inner: Type
    description: str | None = None

    def parse(self, value: Any, where: str = "value") -> Any:
        return None if value is None else self.inner.parse(value, where)

    def _schema(self) -> dict:
        return {"oneOf": [{"type": "null"}, self.inner.schema()]}


@dataclasses.dataclass
class Arr(Type):
    item: Type
    max_items: int = 1000
    description: str | None = None
    min_items: int = 0

    def parse(self, value: Any, where: str = "value") -> list:
        if not isinstance(value, list) or not self.min_items <= len(value) <= self.max_items:
            what = (f"exactly {self.max_items}" if self.min_items == self.max_items else
                    f"{self.min_items} to {self.max_items}" if self.min_items else f"at most {self.max_items}")
            raise _bad(where, f"an array of {what} items")
        return [self.item.parse(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def _schema(self) -> dict:
        out = {"type": "array", "items": self.item.schema(), "maxItems": self.max_items}
        if self.min_items:
            out["minItems"] = self.min_items
        return out


@dataclasses.dataclass
class Map(Type):
    """An object with keys of 1..`max_key_len` characters; from the closed set `keys` when given
    (what a device names, e.g. its metrics: a free key could carry what its user typed)."""

    value: Type
    max_keys: int = 32
    max_key_len: int = 64
    description: str | None = None
    keys: Sequence[str] | None = None

    def parse(self, value: Any, where: str = "value") -> dict:
        if not isinstance(value, Mapping) or len(value) > self.max_keys:
            raise _bad(where, f"an object of at most {self.max_keys} entries")
        out = {}
        for key, v in value.items():
            if self.keys is not None and key not in self.keys:
                raise _bad(where, f"an object whose keys are among {', '.join(self.keys)} (not {_name(key)})")
            if not isinstance(key, str) or not 0 < len(key) <= self.max_key_len:
                raise _bad(where, f"an object whose keys are 1-{self.max_key_len} characters")
            out[key] = self.value.parse(v, f"{where}.{key}")
        return out

    def _schema(self) -> dict:
        names: dict = {"minLength": 1, "maxLength": self.max_key_len, "pattern": NO_NUL}
        if self.keys is not None:
            names = {"enum": list(self.keys)}
        return {"type": "object", "additionalProperties": self.value.schema(),
                "maxProperties": self.max_keys, "propertyNames": names}


def _name(key: object) -> str:
    """A device-chosen name, quoted in an error only if it is a short identifier: a free one could
    carry text, and error messages reach logs."""
    text = str(key)
    return repr(text) if _IDENTIFIER.fullmatch(text) else "a name that is not an identifier"


_IDENTIFIER = re.compile("[A-Za-z0-9_]{1,40}")


@dataclasses.dataclass
class Field:
    name: str
    type: Type
    required: bool = True
    default: Any = None


@dataclasses.dataclass
class Obj(Type):
    """A JSON object with named fields; any other key is refused (400 invalid_field).

    An absent optional field takes its default; null is a value, accepted
    only where the field's type is `Nullable` (a required field that is null
    or absent is `missing_field`).
    """

    name: str
    fields: Sequence[Field]
    description: str | None = None

    def parse(self, value: Any, where: str = "") -> dict:
        """The checked fields as a dict (absent optional fields: their default). `where` is the
        path of this object in the request ("" for the body itself)."""
        if not isinstance(value, Mapping):
            if not where:
                raise ProtocolError(ErrorCode.INVALID_BODY, "the body must be a JSON object")
            raise _bad(where, "a JSON object")
        known = {f.name for f in self.fields}
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"unknown field(s) in {where or 'the body'}: "
                                f"{', '.join(_name(k) for k in unknown[:5])} (known: {', '.join(sorted(known))})")
        out = {}
        for f in self.fields:
            path = f"{where}.{f.name}" if where else f.name
            if f.name not in value:
                if f.required:
                    raise ProtocolError(ErrorCode.MISSING_FIELD, f"missing field '{path}'")
                out[f.name] = f.default
            elif value[f.name] is None and f.required and not isinstance(f.type, Nullable):
                raise ProtocolError(ErrorCode.MISSING_FIELD, f"missing field '{path}' (null)")
            else:
                out[f.name] = f.type.parse(value[f.name], path)
        return out

    def _schema(self) -> dict:
        return {"type": "object", "required": [f.name for f in self.fields if f.required],
                "properties": {f.name: f.type.schema() for f in self.fields},
                "additionalProperties": False}
