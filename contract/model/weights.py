"""The one mapping between named model weights and a flat float32 vector. TensorFlow-free.

Training (Keras/TFF), the TFLite plan's `get_weights`/`set_weights`, the
server's aggregation and the phone all exchange weights as one flat float32
vector; `WeightLayout` says which slice of it is which tensor. Checkpoints on
disk are safetensors files (plain tensors plus string metadata, never pickles)
keyed by the same names.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


class LayoutError(ValueError):
    """Weights that do not fit the layout (names, shapes, sizes or dtype)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class WeightLayout:
    """Ordered (name, shape) list of a model's trainable tensors, with offsets."""

    def __init__(self, named_shapes: Sequence[tuple[str, Sequence[int]]]):
        entries, offset = [], 0
        for name, shape in named_shapes:
            entry = Entry(name, tuple(int(d) for d in shape), offset)
            entries.append(entry)
            offset += entry.size
        if len({e.name for e in entries}) != len(entries):
            raise LayoutError("weight names must be unique")
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.size = offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightLayout) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"WeightLayout({len(self.entries)} tensors, {self.size} floats)"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def sha256(self) -> str:
        """Hash of the layout's canonical JSON: names an order of the flat vector unambiguously."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    def flatten(self, tensors: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
        """Named (or ordered) tensors → float32 [size]."""
        if isinstance(tensors, Mapping):
            missing = set(self.names) - set(tensors)
            extra = set(tensors) - set(self.names)
            if missing or extra:
                raise LayoutError(f"weights do not match the layout: missing {sorted(missing)}, "
                                  f"unexpected {sorted(extra)}")
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.entries):
            raise LayoutError(f"expected {len(self.entries)} tensors, got {len(tensors)}")
        parts = []
        for entry, t in zip(self.entries, tensors):
            t = np.asarray(t)
            if tuple(t.shape) != entry.shape:
                raise LayoutError(f"{entry.name}: shape {tuple(t.shape)} != {entry.shape}")
            parts.append(t.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [size] → {name: tensor} (views into `flat`)."""
        flat = np.asarray(flat)
        if flat.shape != (self.size,):
            raise LayoutError(f"flat vector has shape {flat.shape}, layout needs ({self.size},)")
        if flat.dtype != np.float32:
            raise LayoutError(f"flat vector has dtype {flat.dtype}, layout needs float32")
        return {e.name: flat[e.offset:e.offset + e.size].reshape(e.shape) for e in self.entries}

    def to_json(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]

    @classmethod
    def from_json(cls, data: Sequence[Mapping]) -> "WeightLayout":
        layout = cls([(d["name"], d["shape"]) for d in data])
        if [e.offset for e in layout.entries] != [int(d["offset"]) for d in data]:
            raise LayoutError("layout offsets are not contiguous in order")
        return layout


def save_checkpoint(path: str | Path, layout: WeightLayout, flat: np.ndarray,
                    metadata: Mapping[str, object] | None = None) -> Path:
    """Write `flat` as a safetensors file of named tensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layout": json.dumps(layout.to_json())}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in layout.unflatten(flat).items()},
              str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[WeightLayout, np.ndarray, dict[str, object]]:
    """Read a checkpoint written by `save_checkpoint`: (layout, flat, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="numpy") as f:
        raw_meta = dict(f.metadata() or {})
    if "layout" not in raw_meta:
        raise LayoutError(f"{path} is not a Nightjar checkpoint (no layout metadata)")
    layout = WeightLayout.from_json(json.loads(raw_meta.pop("layout")))
    tensors = load_file(str(path))
    flat = layout.flatten(tensors)
    return layout, flat, {k: json.loads(v) for k, v in raw_meta.items()}


def copy_token_rows(flat: np.ndarray, layout: WeightLayout, vocab_size: int, source: int,
                    targets: Sequence[int]) -> np.ndarray:
    """A copy of `flat` in which, in every tensor and along every axis as long as the vocabulary
    (the embedding's rows, the output layer's columns and bias), the entries of the tokens
    `targets` equal those of `source`: a new word starts as the token that stood for it."""
    out = np.array(flat, np.float32, copy=True)
    for entry in layout.entries:
        view = out[entry.offset:entry.offset + entry.size].reshape(entry.shape)
        for axis, n in enumerate(entry.shape):
            if n != vocab_size:
                continue
            index = [slice(None)] * len(entry.shape)
            index[axis] = source
            row = view[tuple(index)].copy()
            for t in targets:
                index[axis] = t
                view[tuple(index)] = row
    return out
