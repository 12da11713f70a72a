"""The order in which a client visits its examples. TensorFlow-free.

FedAvg's result depends on the order of local SGD steps, so the TFF simulation
and the phone (which trains a LiteRT plan) must batch a client's windows the
same way for the same seed. This module is that single definition.
"""
from __future__ import annotations

import numpy as np


def client_batches(windows: np.ndarray, batch_size: int, epochs: int, seed: int,
                   max_examples: int | None = None) -> list[np.ndarray]:
    """Windows int32 [n, L+1] → batches [b ≤ batch_size, L+1] for `epochs` passes.

    Each epoch visits the windows in a fresh permutation drawn from
    `np.random.default_rng(seed)` — all of them, or the first `max_examples`
    of the permutation; the last batch of an epoch may be short (it is never
    dropped, and batches never straddle two epochs).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return [windows[order[start:start + batch_size]]
            for order in epoch_orders(len(windows), epochs, seed, max_examples)
            for start in range(0, len(order), batch_size)]


def epoch_orders(n: int, epochs: int, seed: int,
                 max_examples: int | None = None) -> list[np.ndarray]:
    """Per epoch, a permutation of range(n) from `np.random.default_rng(seed)`,
    cut to its first `max_examples` entries when given.

    The cap bounds a round's work on a device with a lot of data (and the
    drift of its update), as production FL caps examples per task.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    if max_examples is not None and max_examples < 1:
        raise ValueError("max_examples must be >= 1")
    rng = np.random.default_rng(seed)
    return [rng.permutation(n)[:max_examples] for _ in range(epochs)]


def pad_batch(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """A short batch padded with all-pad rows to the fixed size a TFLite plan needs.

    Pad rows have no non-pad targets, so they add nothing to the masked loss or
    its gradient: the padded batch trains exactly like the short one.
    """
    if len(batch) > batch_size:
        raise ValueError(f"batch of {len(batch)} exceeds batch size {batch_size}")
    out = np.zeros((batch_size,) + batch.shape[1:], dtype=batch.dtype)
    out[:len(batch)] = batch
    return out


def round_seed(seed: int, round_num: int, client_index: int) -> int:
    """Seed of one client's shuffle in one round, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, round_num, client_index]).generate_state(1)[0])
