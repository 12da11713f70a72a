"""Centralized training and evaluation of the CIFG: the server-trained baseline.

Gboard's paper compares the federated model with the same network trained on
pooled data in the data center; `train_central` is that baseline, and
`evaluate` is how every CIFG checkpoint (central, simulated or produced by the
phones) is scored on held-out clients with the metric of `contract.model.metrics`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from contract.model.dropout import Dropout, keep_masks
from contract.model.metrics import Hits
from models.model import (ModelConfig, build_keras_model, masked_cross_entropy,
                          suggestion_hits, weight_layout)
from contract.model.text import PAD_ID


def set_flat_weights(model: tf.keras.Model, config: ModelConfig, flat: np.ndarray) -> None:
    tensors = weight_layout(config).unflatten(np.asarray(flat, np.float32))
    model.set_weights(list(tensors.values()))


def get_flat_weights(model: tf.keras.Model, config: ModelConfig) -> np.ndarray:
    return weight_layout(config).flatten([w.numpy() for w in model.trainable_weights])


@dataclasses.dataclass
class Evaluation:
    hits: Hits
    loss: float   # mean cross-entropy per non-pad target

    def as_dict(self) -> dict[str, float]:
        return {**self.hits.as_dict(), "loss": self.loss}


def evaluate(config: ModelConfig, flat: np.ndarray, windows: np.ndarray | Iterable[np.ndarray],
             batch_size: int = 128) -> Evaluation:
    """Micro-averaged top-1/top-3 and loss of weights `flat` over `windows` [n, L+1]."""
    if not isinstance(windows, np.ndarray):
        windows = np.concatenate(list(windows))
    model = build_keras_model(config)
    set_flat_weights(model, config, flat)

    @tf.function(input_signature=[tf.TensorSpec([None, config.seq_len + 1], tf.int32)])
    def batch_stats(w):
        x, y = w[:, :-1], w[:, 1:]
        logits = model(x)
        mask = tf.cast(tf.not_equal(y, PAD_ID), tf.float32)
        n = tf.reduce_sum(mask)
        return (tf.reduce_sum(suggestion_hits(y, logits, 1) * mask),
                tf.reduce_sum(suggestion_hits(y, logits, 3) * mask),
                n, masked_cross_entropy(y, logits) * n)

    top1 = top3 = tokens = loss_sum = 0.0
    for start in range(0, len(windows), batch_size):
        h1, h3, n, ls = (float(v) for v in batch_stats(windows[start:start + batch_size]))
        top1, top3, tokens, loss_sum = top1 + h1, top3 + h3, tokens + n, loss_sum + ls
    return Evaluation(Hits(int(top1), int(top3), int(tokens)), loss_sum / max(tokens, 1.0))


@dataclasses.dataclass
class CentralResult:
    flat: np.ndarray
    history: list[dict]   # one row per epoch: train loss, held-out metrics, seconds


def train_central(config: ModelConfig, train_windows: Sequence[np.ndarray] | np.ndarray,
                  eval_windows: np.ndarray | None = None, epochs: int = 1,
                  batch_size: int = 64, learning_rate: float = 1e-3,
                  seed: int = 0, dropout: Dropout | None = None) -> CentralResult:
    """Adam on the pooled training windows; evaluates on `eval_windows` after each epoch.

    `dropout`: each step's masks come from contract.model.dropout (keyed by `seed` and the step),
    the same placement and arithmetic as a phone's training plan."""
    pooled = train_windows if isinstance(train_windows, np.ndarray) else np.concatenate(list(train_windows))
    model = build_keras_model(config, dropout)
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    rng = np.random.default_rng(seed)
    masks = len(dropout.placement) if dropout is not None else 0
    mask_spec = tf.TensorSpec([None, config.seq_len, config.embedding_dim], tf.uint8)

    @tf.function(input_signature=[tf.TensorSpec([None, config.seq_len + 1], tf.int32)] + [mask_spec] * masks)
    def step(w, *keep):
        with tf.GradientTape() as tape:
            loss = masked_cross_entropy(w[:, 1:], model((w[:, :-1], *keep) if keep else w[:, :-1]))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return loss

    def keep(step_index: int, rows: int) -> list[np.ndarray]:
        if dropout is None:
            return []
        return [m.astype(np.uint8) for m in keep_masks(dropout, seed, step_index, rows, config.seq_len,
                                                         config.embedding_dim)]

    history, steps = [], 0
    for epoch in range(epochs):
        start = time.monotonic()
        order = rng.permutation(len(pooled))
        losses = []
        bar = tqdm(range(0, len(pooled), batch_size), desc=f"central epoch {epoch + 1}/{epochs}",
                   unit="batch", leave=False)
        for i in bar:
            batch = pooled[order[i:i + batch_size]]
            losses.append(float(step(batch, *keep(steps, len(batch)))))
            steps += 1
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
               "seconds": time.monotonic() - start}
        if eval_windows is not None:
            flat = get_flat_weights(model, config)
            row["heldout"] = evaluate(config, flat, eval_windows).as_dict()
            tqdm.write(f"central epoch {epoch + 1}: train loss {row['train_loss']:.3f}, held-out "
                       f"top-1 {row['heldout']['top1']:.4f} top-3 {row['heldout']['top3']:.4f}")
        history.append(row)
    return CentralResult(get_flat_weights(model, config), history)
