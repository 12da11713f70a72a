"""Robust aggregation: coordinate-wise trimmed mean and median. TensorFlow-free, pure NumPy.

Byzantine-robust rules (Yin et al. 2018) look at every update in the clear:
each coordinate's mean after dropping the largest and smallest `trim`
fraction of the values, or its median. They cannot run under secure
aggregation, which gives the server only a sum, and they hold all n updates
at once: n × d × 4 bytes (`memory_bytes`), 57 MB for 10 Gboard-size updates,
570 MB for 100. They are for small rounds the server can read, against a
minority that sends outliers; a bounded weight and the clip already limit
what any one device can do to a mean (contract.update.pipeline).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from contract.update.stages import Stage

AGGREGATORS = ("mean", "trimmed_mean", "median")


def zeroing_norm(multiplier: float, norms) -> float:
    """The norm above which a round zeroes an update: `multiplier` × the median of the last training
    round's accepted norms (0, none, before there is one).

    TFF's default zeroing (`_default_zeroing`) adapts the same kind of bound
    toward a high quantile of the norms, on the clients. Here the server
    reads each update's norm in a plain round, so an update far above what
    honest devices sent (a boosted, scaled or replaced model) is counted but
    adds nothing; a median moves only when half the cohort attacks.
    """
    norms = [float(n) for n in norms if n is not None and math.isfinite(n)]
    if not multiplier or not norms:
        return 0.0
    return float(multiplier * np.median(norms))


def memory_bytes(updates: int, size: int) -> int:
    """What holding `updates` float32 updates of `size` values costs."""
    return 4 * int(updates) * int(size)


def trimmed(n: int, trim: float) -> int:
    """Values dropped at each end of a coordinate among n: floor(trim · n), leaving at least one."""
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    return min(int(math.floor(trim * n)), (n - 1) // 2)


def trimmed_mean(updates: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise mean of `updates` [n, d] without the k = `trimmed(n, trim)` largest and smallest."""
    updates = np.asarray(updates, np.float32)
    n = updates.shape[0]
    if n == 0:
        raise ValueError("no updates to aggregate")
    k = trimmed(n, trim)
    if k == 0:
        return updates.mean(axis=0, dtype=np.float64).astype(np.float32)
    part = np.partition(updates, (k, n - k - 1), axis=0)
    return part[k:n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


def median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of `updates` [n, d] (the mean of the middle two for even n)."""
    updates = np.asarray(updates, np.float32)
    if updates.shape[0] == 0:
        raise ValueError("no updates to aggregate")
    return np.median(updates, axis=0).astype(np.float32)


def aggregate(kind: str, updates: np.ndarray, trim: float = 0.1) -> np.ndarray:
    """The `kind` aggregate of `updates` [n, d]: one of AGGREGATORS."""
    if kind == "mean":
        return np.asarray(updates, np.float32).mean(axis=0, dtype=np.float64).astype(np.float32)
    if kind == "trimmed_mean":
        return trimmed_mean(updates, trim)
    if kind == "median":
        return median(updates)
    raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}")


@dataclasses.dataclass(frozen=True)
class RobustAggregation(Stage):
    """The update pipeline's first stage when a round aggregates robustly: not linear.

    The device's half changes nothing; the server keeps every accepted update
    (the round's "running sum" is their stack, contract.update.pipeline) and
    combines them with this rule once the round closes. Not being linear is
    what makes the pipeline refuse it under secure aggregation.
    """

    kind: str
    trim: float = 0.1
    linear = False

    def combine(self, updates: np.ndarray) -> np.ndarray:
        return aggregate(self.kind, updates, self.trim)
