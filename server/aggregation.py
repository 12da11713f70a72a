"""Decoding, validating and averaging model updates. Pure NumPy, no I/O, no Flask.

Wire format of an update (the body of `POST /v1/sessions/<id>/update`): a
safetensors file with exactly one tensor, `"delta"`, float32, shape `[N]`,
where N is the population's `WeightLayout.size` and the vector is
`trained weights - downloaded weights`, flattened in layout order (see
`contract.weights`). Safetensors is a header plus raw little-endian data: no
code runs on load, unlike pickle.

Aggregation follows Flower's strategy split: `validate_update` decides whether
one (update, weight) pair may be used, `WeightedSum` folds accepted pairs one at
a time (memory O(model), never O(devices x model)), and the average is
`sum(w_i * delta_i) / sum(w_i)` with w_i the device's number of examples, as in
TFF's `build_weighted_fed_avg`.
"""
from __future__ import annotations

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from server.errors import InvalidUpdate

UPDATE_TENSOR = "delta"


def encode_update(delta: np.ndarray) -> bytes:
    """The wire bytes of a flat float32 delta (what a device uploads)."""
    return st_save({UPDATE_TENSOR: np.ascontiguousarray(delta, dtype=np.float32)})


def decode_update(data: bytes, size: int) -> np.ndarray:
    """Wire bytes → validated float32 [size]; InvalidUpdate says what is wrong."""
    try:
        tensors = st_load(data)
    except BaseException as e:  # safetensors' errors (and a Rust panic, a BaseException) on bad input
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise InvalidUpdate(f"the body is not a safetensors file ({type(e).__name__})",
                            code="malformed_update") from None
    if set(tensors) != {UPDATE_TENSOR}:
        raise InvalidUpdate(f"an update holds exactly one tensor named '{UPDATE_TENSOR}', "
                            f"got {sorted(tensors)[:5]}", code="malformed_update")
    return validate_update(tensors[UPDATE_TENSOR], size)


def validate_update(update: np.ndarray, size: int) -> np.ndarray:
    if update.dtype != np.float32:
        raise InvalidUpdate(f"'{UPDATE_TENSOR}' has dtype {update.dtype}, expected float32",
                            code="wrong_dtype")
    if update.shape != (size,):
        raise InvalidUpdate(f"'{UPDATE_TENSOR}' has shape {list(update.shape)}, expected [{size}]",
                            code="wrong_shape")
    if not np.isfinite(update).all():
        raise InvalidUpdate(f"'{UPDATE_TENSOR}' contains NaN or Inf", code="non_finite")
    return update


class WeightedSum:
    """Running sum(w_i * x_i) and sum(w_i) over float32 vectors of one size."""

    def __init__(self, size: int, total: np.ndarray | None = None, weight: float = 0.0,
                 count: int = 0):
        self.total = np.zeros(size, np.float32) if total is None else total
        self.weight = float(weight)
        self.count = int(count)

    def add(self, update: np.ndarray, weight: float) -> "WeightedSum":
        if not weight > 0:
            raise ValueError("an update's weight must be > 0")
        self.total += np.float32(weight) * update
        self.weight += weight
        self.count += 1
        return self

    def merge(self, other: "WeightedSum") -> "WeightedSum":
        self.total += other.total
        self.weight += other.weight
        self.count += other.count
        return self

    def mean(self) -> np.ndarray:
        if self.weight <= 0:
            raise ValueError("no update has been added")
        return (self.total / np.float32(self.weight)).astype(np.float32, copy=False)


def weighted_mean(pairs, size: int) -> np.ndarray:
    """The weighted average of an iterable of (update, weight), folded one at a time."""
    acc = WeightedSum(size)
    for update, weight in pairs:
        acc.add(update, weight)
    return acc.mean()
