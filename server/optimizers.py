"""Server optimizers in NumPy with exactly TFF 0.87's semantics.

`tff.learning.algorithms.build_weighted_fed_avg` averages the clients'
`initial - trained` weights (the *negative* of the delta a Nightjar device
uploads) and hands that average to the server optimizer as the gradient:
`optimizer.next(state, weights, gradient)`. `apply_mean_delta` does the same
with `gradient = -mean_delta`, and like TFF's `reject_non_finite_update`
leaves weights and state unchanged if that gradient is not finite.

Each optimizer below transcribes the update rule of the corresponding file in
tensorflow_federated/python/learning/optimizers/ (sgdm.py, adam.py, yogi.py),
operation for operation and in float32, so the results match TFF's to float32
rounding (tests/test_server_optimizers.py compares them over several steps).
The state is a dict of float32 arrays plus an integer "step", so it can be
saved as safetensors between rounds (`state_to_bytes` / `state_from_bytes`).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contract.optimizers import SERVER_OPTIMIZERS

State = dict[str, object]
F32 = np.float32


class ServerOptimizer(Protocol):
    name: str

    def initialize(self, size: int) -> State: ...

    def next(self, state: State, weights: np.ndarray, gradient: np.ndarray) -> tuple[State, np.ndarray]: ...

    def published(self) -> dict: ...


def _published(optimizer, momentum: float | None = None, **extra: float) -> dict:
    """What a version publishes of the optimizer that made it (the versions endpoint's `train`), so an
    independent verifier can step the parent by the round's mean itself: server_lr, server_momentum
    (sgdm's; null for the others) and the rest of its hyperparameters as server_<name>."""
    return {"server_lr": float(optimizer.learning_rate), "server_momentum": momentum,
            **{f"server_{k}": float(v) for k, v in extra.items()}}


@dataclasses.dataclass(frozen=True)
class SGD:
    """TFF `build_sgdm`: w -= lr * g; with momentum m: v = m * v + g; w -= lr * v."""

    learning_rate: float = 0.01
    momentum: float | None = None
    name: str = "sgd"

    def published(self) -> dict:
        return _published(self, float(self.momentum) if self.momentum else None)

    def initialize(self, size: int) -> State:
        state: State = {"step": 0}
        if self.momentum:  # TFF tracks an accumulator only for a non-zero momentum
            state["accumulator"] = np.zeros(size, F32)
        return state

    def next(self, state: State, weights: np.ndarray, gradient: np.ndarray) -> tuple[State, np.ndarray]:
        lr = F32(self.learning_rate)
        if "accumulator" not in state:
            return {"step": state["step"] + 1}, weights - lr * gradient
        accumulator = F32(self.momentum) * state["accumulator"] + gradient
        return ({"step": state["step"] + 1, "accumulator": accumulator},
                weights - lr * accumulator)


def _normalized_lr(lr: float, beta_1: float, beta_2: float, step: int) -> np.float32:
    t = F32(step)
    return F32(lr) * np.sqrt(F32(1.0) - F32(beta_2) ** t) / (F32(1.0) - F32(beta_1) ** t)


@dataclasses.dataclass(frozen=True)
class Adam:
    """TFF `build_adam` (defaults beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""

    learning_rate: float
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    name: str = "adam"

    def published(self) -> dict:
        return _published(self, beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)

    def initialize(self, size: int) -> State:
        return {"step": 0, "accumulator": np.zeros(size, F32), "preconditioner": np.zeros(size, F32)}

    def next(self, state: State, weights: np.ndarray, gradient: np.ndarray) -> tuple[State, np.ndarray]:
        step = state["step"] + 1
        lr = _normalized_lr(self.learning_rate, self.beta_1, self.beta_2, step)
        a, p = state["accumulator"], state["preconditioner"]
        a = a + (gradient - a) * (F32(1.0) - F32(self.beta_1))
        p = p + (np.square(gradient) - p) * (F32(1.0) - F32(self.beta_2))
        weights = weights - lr * a / (np.sqrt(p) + F32(self.epsilon))
        return {"step": step, "accumulator": a, "preconditioner": p}, weights


@dataclasses.dataclass(frozen=True)
class Yogi:
    """TFF `build_yogi` (epsilon 1e-3, preconditioner starting at 1e-6)."""

    learning_rate: float
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-3
    initial_preconditioner_value: float = 1e-6
    name: str = "yogi"

    def published(self) -> dict:
        return _published(self, beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
                          initial_preconditioner=self.initial_preconditioner_value)

    def initialize(self, size: int) -> State:
        return {"step": 0, "accumulator": np.zeros(size, F32),
                "preconditioner": np.full(size, self.initial_preconditioner_value, F32)}

    def next(self, state: State, weights: np.ndarray, gradient: np.ndarray) -> tuple[State, np.ndarray]:
        step = state["step"] + 1
        lr = _normalized_lr(self.learning_rate, self.beta_1, self.beta_2, step)
        a, p = state["accumulator"], state["preconditioner"]
        a = a + (gradient - a) * (F32(1.0) - F32(self.beta_1))
        g2 = np.square(gradient)
        p = p + (F32(1.0) - F32(self.beta_2)) * np.sign(g2 - p) * g2   # TFF's code: sign(g^2 - p)
        weights = weights - lr * a / (np.sqrt(p) + F32(self.epsilon))
        return {"step": step, "accumulator": a, "preconditioner": p}, weights


def build_server_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> ServerOptimizer:
    """The optimizers `models.simulate.server_optimizer` builds from TFF, by the same names."""
    builders = {
        "sgd": lambda: SGD(learning_rate),
        "sgdm": lambda: SGD(learning_rate, momentum=momentum, name="sgdm"),
        "adam": lambda: Adam(learning_rate),
        "yogi": lambda: Yogi(learning_rate),
    }
    assert set(builders) == set(SERVER_OPTIMIZERS)
    if name not in builders:
        raise ValueError(f"unknown server optimizer {name!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
    return builders[name]()


def apply_mean_delta(optimizer: ServerOptimizer, state: State, weights: np.ndarray,
                     mean_delta: np.ndarray) -> tuple[State, np.ndarray, bool]:
    """One server step from the averaged client delta; returns (state, weights, applied)."""
    gradient = -np.asarray(mean_delta, F32)
    if not np.isfinite(gradient).all():
        return state, weights, False
    new_state, new_weights = optimizer.next(state, weights, gradient)
    return new_state, new_weights.astype(F32, copy=False), True


def state_to_bytes(optimizer: ServerOptimizer, state: State) -> bytes:
    tensors = {k: np.ascontiguousarray(v, F32) for k, v in state.items() if k != "step"}
    tensors["step"] = np.array([state["step"]], np.int64)
    return st_save(tensors, metadata={"optimizer": optimizer.name})


def state_from_bytes(data: bytes) -> State:
    tensors = st_load(data)
    state: State = {k: v for k, v in tensors.items() if k != "step"}
    state["step"] = int(tensors["step"][0])
    return state
