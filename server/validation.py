"""Typed reads of what a request carries outside a JSON body (the query string), and JSON itself.

Bodies are checked against the protocol's own schemas (contract.protocol.wire,
contract.protocol.schema); this module only decodes JSON safely and reads query
parameters with the same rules, so every value a client sends fails as a
400 `ProtocolError`, never as a 500.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from contract.protocol.errors import ErrorCode, ProtocolError
from contract.protocol.schema import MAX_INT, Int, Type

__all__ = ["MAX_INT", "parse_json", "query_int", "query_json"]
_MISSING = object()


def parse_json(data: bytes, what: str = "body") -> Any:
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.MALFORMED_JSON, f"{what} is not valid JSON") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def query_int(args: Mapping[str, str], key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
    raw = args.get(key)
    if raw is None:
        if default is _MISSING:
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"missing query parameter '{key}'")
        return default
    if len(raw) > 40:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"query parameter '{key}' must be an integer")
    try:
        value = float(raw) if "." in raw or "e" in raw.lower() else int(raw, 10)
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"query parameter '{key}' must be an integer") from None
    return Int(lo, hi).parse(value, key)


def query_json(args: Mapping[str, str], key: str, schema: Type, default: Any = None) -> Any:
    """A query parameter holding JSON, checked against `schema`."""
    raw = args.get(key)
    if raw is None:
        return default
    return schema.parse(parse_json(raw.encode(), f"query parameter '{key}'"), key)
