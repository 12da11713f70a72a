"""Typed reads of client-supplied JSON values that fail as `BadRequest`, never as a 500.

JSON is loose (true is not 1, 1.0 is not 1, NaN parses in Python), and every
value a device sends ends up in a comparison, a sum or the database; these
helpers are the single place where a value's type and range are checked.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from server.errors import BadRequest

_MISSING = object()
MAX_INT = 2**53  # JSON numbers are exact up to here; SQLite's limit is 2**63
MAX_METRIC = 1e12  # sums of reported metrics stay finite (JSON has no Infinity)


def as_object(value: Any, what: str = "body") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRequest(f"{what} must be a JSON object", code="invalid_body")
    return value


def parse_json(data: bytes, what: str = "body") -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON", code="malformed_json") from None


def required(obj: Mapping[str, Any], key: str, where: str = "") -> Any:
    value = obj.get(key)
    if value is None:
        raise BadRequest(f"missing field '{where}{key}'", code="missing_field")
    return value


def boolean(obj: Mapping[str, Any], key: str, default: Any = _MISSING, where: str = "") -> bool:
    if obj.get(key) is None and default is not _MISSING:
        return default
    value = required(obj, key, where)
    if not isinstance(value, bool):
        raise BadRequest(f"'{where}{key}' must be true or false", code="invalid_field")
    return value


def integer(obj: Mapping[str, Any], key: str, default: Any = _MISSING, lo: int | None = None,
            hi: int | None = MAX_INT, where: str = "") -> int:
    if obj.get(key) is None and default is not _MISSING:
        return default
    value = required(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{where}{key}' must be an integer", code="invalid_field")
    _check_range(value, lo, hi, where + key)
    return value


def number(obj: Mapping[str, Any], key: str, default: Any = _MISSING, lo: float | None = None,
           hi: float | None = None, where: str = "") -> float:
    if obj.get(key) is None and default is not _MISSING:
        return default
    value = required(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{where}{key}' must be a finite number", code="invalid_field")
    _check_range(value, lo, hi, where + key)
    return float(value)


def string(obj: Mapping[str, Any], key: str, default: Any = _MISSING, max_len: int = 200,
           choices: tuple[str, ...] | None = None, where: str = "") -> str:
    if obj.get(key) is None and default is not _MISSING:
        return default
    value = required(obj, key, where)
    if not isinstance(value, str) or len(value) > max_len:
        raise BadRequest(f"'{where}{key}' must be a string of at most {max_len} characters",
                         code="invalid_field")
    if choices is not None and value not in choices:
        raise BadRequest(f"'{where}{key}' must be one of {', '.join(choices)}", code="invalid_field")
    return value


def metrics(value: Any, what: str = "metrics", max_keys: int = 32) -> dict[str, float]:
    """A flat {name: finite number} map, as devices report training metrics."""
    obj = as_object(value, what)
    if len(obj) > max_keys:
        raise BadRequest(f"{what} has more than {max_keys} entries", code="invalid_field")
    out = {}
    for key in obj:
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise BadRequest(f"{what} keys must be strings of 1-64 characters", code="invalid_field")
        out[key] = number(obj, key, lo=-MAX_METRIC, hi=MAX_METRIC, where=f"{what}.")
    return out


def query_int(args: Mapping[str, str], key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
    raw = args.get(key)
    if raw is None:
        if default is _MISSING:
            raise BadRequest(f"missing query parameter '{key}'", code="missing_field")
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadRequest(f"query parameter '{key}' must be an integer", code="invalid_field") from None
    _check_range(value, lo, hi, key)
    return value


def _check_range(value: float, lo: float | None, hi: float | None, name: str) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"'{name}' must be in [{lo}, {hi}]", code="invalid_field")
