"""How vector files hold values, how a safetensors body is read for comparison, and how outputs compare.

Values are JSON: bytes as lowercase hex strings (fields named `*_hex`; compared exactly, so an
implementation writes lowercase),
integer arrays as lists of integers, float arrays as lists of numbers (each
float64 written as Python's shortest round-trip repr, each float32 value as
the float64 it converts to exactly). An output field named
`*_safetensors_hex` is a whole safetensors file: it is compared by what it
holds (`read_safetensors`: the metadata and each tensor's dtype, shape and
bytes), not byte for byte, because the header's key order is not fixed (the
reference writer's metadata order varies from run to run). The files store
it in `write_safetensors`' canonical form.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

SAFETENSORS_SUFFIX = "_safetensors_hex"
DTYPE_BYTES = {"U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "U32": 4, "I32": 4, "F32": 4,
               "U64": 8, "I64": 8, "F64": 8}


def read_safetensors(data: bytes) -> dict:
    """{"metadata": {...}, "tensors": {name: {"dtype", "shape", "data_hex"}}} of a safetensors file;
    ValueError if it is not one."""
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError("the header length runs past the end")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    body = data[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        if start != end or stop < start or stop - start != DTYPE_BYTES[info["dtype"]] * math.prod(info["shape"]):
            raise ValueError(f"tensor {name!r}: offsets [{start}, {stop}) do not fit")
        tensors[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "data_hex": body[start:stop].hex()}
        end = stop
    if end != len(body):
        raise ValueError("the data section is longer than its tensors")
    return {"metadata": dict(metadata), "tensors": tensors}


def write_safetensors(parsed: Mapping) -> bytes:
    """The canonical bytes of `read_safetensors`' form: header keys sorted ("__metadata__" first),
    tensors laid out in name order, the header padded with spaces to a multiple of 8 bytes."""
    header: dict[str, Any] = {}
    if parsed["metadata"]:
        header["__metadata__"] = dict(sorted(parsed["metadata"].items()))
    data, offset = b"", 0
    for name in sorted(parsed["tensors"]):
        t = parsed["tensors"][name]
        chunk = bytes.fromhex(t["data_hex"])
        header[name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "data_offsets": [offset, offset + len(chunk)]}
        data, offset = data + chunk, offset + len(chunk)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def canonical_body(hex_text: str) -> str:
    """A safetensors file's canonical form (`write_safetensors`), as hex."""
    return write_safetensors(read_safetensors(bytes.fromhex(hex_text))).hex()


def compare(expected: Any, actual: Any, tolerance: Mapping[str, float] | None = None) -> list[str]:
    """Where an output `actual` differs from `expected` (empty: it matches). Numbers match exactly,
    except in the top-level fields `tolerance` names (a relative tolerance); a `*_safetensors_hex`
    field by content. Fields `actual` has beyond `expected`'s are not compared."""
    if not isinstance(expected, Mapping) or not isinstance(actual, Mapping):
        return [f"output: expected an object, got {_short(actual)}"]
    out: list[str] = []
    for key, value in expected.items():
        if key not in actual:
            out.append(f"{key}: missing")
        elif key.endswith(SAFETENSORS_SUFFIX):
            out += _compare_body(value, actual[key], key)
        else:
            out += _same(value, actual[key], (tolerance or {}).get(key, 0.0), key)
    return out


def _same(expected: Any, actual: Any, rtol: float, path: str) -> list[str]:
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return [f"{path}: expected an object, got {_short(actual)}"]
        out: list[str] = []
        for key, value in expected.items():
            out += [f"{path}.{key}: missing"] if key not in actual else _same(value, actual[key], rtol, f"{path}.{key}")
        return out
    if isinstance(expected, list):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{path}: expected {len(expected)} items, got {_short(actual)}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            out += _same(e, a, rtol, f"{path}[{i}]")
            if len(out) >= 5:
                break
        return out
    if isinstance(expected, str):
        return [] if actual == expected else [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    if isinstance(expected, bool) or expected is None:
        return [] if actual is expected else [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return [f"{path}: expected the number {expected!r}, got {_short(actual)}"]
    if expected == actual or (rtol and abs(expected - actual) <= rtol * max(abs(expected), abs(actual))):
        return []
    return [f"{path}: expected {expected!r}, got {actual!r}"]


def _compare_body(expected_hex: str, actual_hex: Any, path: str) -> list[str]:
    try:
        actual = read_safetensors(bytes.fromhex(actual_hex))
    except (ValueError, TypeError, KeyError) as e:
        return [f"{path}: not a safetensors file ({e})"]
    return [f"{path}.{d}" for d in compare(read_safetensors(bytes.fromhex(expected_hex)), actual)]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else value.hex()
    return text if len(text) <= 80 else text[:77] + "..."


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with objects indented and lists of scalars on one line (vector files stay readable)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return json.dumps(list(value), allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False)
