"""The server's NumPy optimizers against TFF 0.87's `tff.learning.optimizers`, step by step.

The TFF optimizer objects are plain TensorFlow (no federated computation, no
worker process): `initialize(specs)` and `next(state, weights, gradient)`.
They agree bit for bit here; the tolerance only allows for other CPUs.
The server applies `gradient = -mean_delta` (TFF averages `initial - trained`,
Nightjar devices upload `trained - initial`).
"""
from __future__ import annotations

import numpy as np
import pytest

from server.optimizers import (apply_mean_delta, build_server_optimizer, state_from_bytes,
                               state_to_bytes)
from tests.server_fixtures import SMALL_LAYOUT

STEPS = 6


def _tff_optimizer(name: str, lr: float):
    import tensorflow_federated as tff

    opts = tff.learning.optimizers
    return {"sgd": lambda: opts.build_sgdm(learning_rate=lr),
            "sgdm": lambda: opts.build_sgdm(learning_rate=lr, momentum=0.9),
            "adam": lambda: opts.build_adam(learning_rate=lr),
            "yogi": lambda: opts.build_yogi(learning_rate=lr)}[name]()


@pytest.mark.parametrize("name,lr", [("sgd", 1.0), ("sgdm", 0.7), ("adam", 0.01), ("yogi", 0.02)])
def test_server_optimizer_matches_tff_over_several_steps(name, lr):
    import tensorflow as tf

    layout = SMALL_LAYOUT
    rng = np.random.default_rng(7)
    weights = rng.normal(0, 0.5, layout.size).astype(np.float32)
    ours = build_server_optimizer(name, lr, momentum=0.9)
    state = ours.initialize(layout.size)
    theirs = _tff_optimizer(name, lr)
    specs = tuple(tf.TensorSpec(e.shape, tf.float32) for e in layout.entries)
    tff_state = theirs.initialize(specs)
    tff_weights = tuple(tf.constant(t) for t in layout.unflatten(weights.copy()).values())
    for step in range(STEPS):
        # Client deltas of varying sign and scale, averaged by number of examples.
        deltas = rng.normal(0, 0.1 * (step + 1), (3, layout.size)).astype(np.float32)
        counts = np.array([5.0, 17.0, 2.0], np.float32)
        mean_delta = (counts[:, None] * deltas).sum(0) / counts.sum()
        state, weights, applied = apply_mean_delta(ours, state, weights, mean_delta.astype(np.float32))
        assert applied
        gradient = tuple(tf.constant(t) for t in layout.unflatten(-mean_delta.astype(np.float32)).values())
        tff_state, tff_weights = theirs.next(tff_state, tff_weights, gradient)
        expected = layout.flatten([w.numpy() for w in tff_weights])
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7, err_msg=f"{name} step {step}")
        for key in ("accumulator", "preconditioner"):
            if key in state:
                np.testing.assert_allclose(state[key], layout.flatten([t.numpy() for t in tff_state[key]]),
                                           rtol=1e-6, atol=1e-8, err_msg=f"{name} {key} step {step}")
        assert weights.dtype == np.float32


def test_non_finite_update_is_rejected_like_tff_and_state_round_trips():
    opt = build_server_optimizer("adam", 0.1)
    state = opt.initialize(4)
    weights = np.ones(4, np.float32)
    state, weights, applied = apply_mean_delta(opt, state, weights, np.array([1, -1, 0.5, 0], np.float32))
    assert applied and state["step"] == 1
    same_state, same_weights, applied = apply_mean_delta(opt, state, weights,
                                                         np.array([np.nan, 0, 0, 0], np.float32))
    assert not applied and same_state is state and same_weights is weights
    back = state_from_bytes(state_to_bytes(opt, state))
    assert back["step"] == 1 and set(back) == set(state)
    np.testing.assert_array_equal(back["preconditioner"], state["preconditioner"])
    with pytest.raises(ValueError, match="unknown server optimizer"):
        build_server_optimizer("lamb", 0.1)
