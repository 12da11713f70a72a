"""Local training of a LiteRT plan on the phone's own examples: FedAvg's client step.

Given the server's weights and the task's hyperparameters, the device tokenizes
its stored text with the plan's vocabulary, visits the windows in the order
`contract.model.batching` defines for the task's seed (the order TFF's simulation uses
too), runs one SGD step per batch in LiteRT, and returns the weight delta and
the number of examples it represents — FedAvg's client weight. A plan
exported with dropout gets each step's masks drawn from the task's seed
(contract.model.dropout), the masks the simulation draws for the same seed.
Between every
two batches it asks `should_stop`; a reason aborts the task at once, before
the next batch, and nothing of the partial training survives.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from contract.model.batching import client_batches
from contract.model.dropout import keep_masks
from contract.model.text import to_sequences
from device_runtime.errors import DeviceError
from tflite_export.reader import TrainingPlan


class Interrupted(DeviceError):
    """Training stopped because a condition failed; `reason` is the policy's code."""

    outcome, plan_reusable = "interrupted", True

    def __init__(self, reason: str, batches_done: int):
        message = f"training interrupted after {batches_done} batches: {reason}"
        super().__init__(message, detail=message)
        self.reason, self.batches_done = reason, batches_done


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    learning_rate: float
    epochs: int
    batch_size: int
    seed: int
    max_examples: int | None = None   # cap on windows per epoch (see contract.model.batching)


@dataclasses.dataclass
class LocalUpdate:
    delta: np.ndarray        # trained − initial weights, float32 [layout.size]
    num_examples: int        # windows trained on, over all epochs (FedAvg's weight)
    metrics: dict[str, float]


def local_windows(plan: TrainingPlan, texts: list[str]) -> np.ndarray:
    """The device's text as token windows [n, seq_len + 1], with the plan's vocabulary."""
    return to_sequences(texts, plan.vocab, plan.seq_len)


def train_locally(plan: TrainingPlan, initial: np.ndarray, windows: np.ndarray,
                  hp: Hyperparameters,
                  should_stop: Callable[[], str | None] = lambda: None) -> LocalUpdate:
    """FedAvg's client update with `plan`, interruptible between batches.

    A task batch smaller than the plan's fixed batch is fine: the plan pads
    it with all-pad rows, which add nothing to the loss or its gradient.
    """
    if not 1 <= hp.batch_size <= plan.batch_size:
        raise ValueError(f"task batch size {hp.batch_size} is not in [1, the plan's {plan.batch_size}]")
    plan.set_weights(initial)
    batches = client_batches(windows, hp.batch_size, hp.epochs, hp.seed, hp.max_examples)
    start = time.monotonic()
    loss_sum = tokens = 0.0
    for done, batch in enumerate(batches):
        reason = should_stop()
        if reason:
            plan.set_weights(initial)   # leave no half-trained state behind
            raise Interrupted(reason, done)
        keep = (keep_masks(plan.dropout, hp.seed, done, len(batch), plan.seq_len,
                           int(plan.manifest.model_config["embedding_dim"])) if plan.dropout else ())
        step = plan.train_windows(batch, hp.learning_rate, keep)
        loss_sum += step.loss * step.tokens
        tokens += step.tokens
    delta = plan.get_weights() - np.asarray(initial, np.float32)
    return LocalUpdate(delta=delta.astype(np.float32),
                       num_examples=int(sum(len(b) for b in batches)),
                       metrics={"loss": loss_sum / max(tokens, 1.0), "tokens": tokens,
                                "batches": float(len(batches)),
                                "train_seconds": time.monotonic() - start})
