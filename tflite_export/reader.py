"""The device side: load a verified plan or app model with LiteRT. TensorFlow-free.

A phone has `ai_edge_litert` and numpy, never TensorFlow; this module (and
everything it imports) runs there. Both loaders verify the manifest first
(`manifest.load_verified`: files present, hashes, schema version, vocabulary)
and hand LiteRT the exact bytes that were hashed.

Contexts for `AppModel.suggest` are token ids starting with <bos>. The model
reads at most `seq_len` tokens; a longer context keeps its last `seq_len`
tokens, read from zero state like the training windows that start inside a
long sentence (training cuts sentences into windows of seq_len, so the model
has learned to predict from a mid-sentence start). This gives every
prediction the most context the model can use; up to `seq_len` tokens it is
exactly the training model's prediction at that position.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from contract.model.batching import pad_batch
from contract.model.text import Vocabulary
from contract.model.weights import WeightLayout
from contract.artifacts.manifest import (APP_MODEL, TRAINING_PLAN, Manifest, check_signatures,
                                    load_verified)
from tflite_export.modelinfo import interpreter_signatures


def _interpreter(model: bytes, manifest: Manifest, source: Path,
                 num_threads: int | None) -> Interpreter:
    interpreter = Interpreter(model_content=model, num_threads=num_threads)
    check_signatures(manifest, interpreter_signatures(interpreter), source)
    return interpreter


def _check_tokens(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{what}: token ids must be in [0, {vocab_size})")


@dataclasses.dataclass(frozen=True)
class TrainStep:
    loss: float    # mean cross-entropy over the batch's non-pad targets, before the step
    tokens: int    # non-pad targets in the batch (the weight of this step's loss)


class TrainingPlan:
    """A training plan in LiteRT: one SGD step, inference, and the weights as one flat vector."""

    def __init__(self, manifest: Manifest, vocab: Vocabulary, model: bytes,
                 source: Path, num_threads: int | None = None):
        self.manifest, self.vocab, self.source = manifest, vocab, source
        self.layout: WeightLayout = manifest.layout
        self.batch_size: int = manifest.batch_size
        self.seq_len: int = manifest.seq_len
        self.dropout = manifest.training_dropout        # None: `train` takes no masks
        self._vocab_size = int(manifest.model_config["vocab_size"])
        self._mask_shape = (self.seq_len, int(manifest.model_config["embedding_dim"]))
        interpreter = _interpreter(model, manifest, source, num_threads)
        self._train = interpreter.get_signature_runner("train")
        self._personalize = interpreter.get_signature_runner("personalize")
        self._next_probs = interpreter.get_signature_runner("next_probs")
        self._infer = interpreter.get_signature_runner("infer")
        self._get = interpreter.get_signature_runner("get_weights")
        self._set = interpreter.get_signature_runner("set_weights")
        self._interpreter = interpreter

    def _batch(self, rows: np.ndarray, what: str) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.seq_len or not 1 <= len(rows) <= self.batch_size:
            raise ValueError(f"{what}: expected [1..{self.batch_size}, {self.seq_len}] token ids, "
                             f"got shape {rows.shape}")
        _check_tokens(rows, self._vocab_size, what)
        return pad_batch(rows.astype(np.int32, copy=False), self.batch_size)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float,
                   keep: Sequence[np.ndarray] = ()) -> TrainStep:
        """One SGD step on inputs x and targets y [n ≤ batch_size, seq_len] (padded here).

        A plan with dropout needs `keep`: one 0/1 mask [n, seq_len, E] per placement of
        `self.dropout` (contract.model.dropout.keep_masks); a plan without takes none."""
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ValueError(f"x {x.shape} and y {y.shape} must have the same shape")
        out = self._train(x=self._batch(x, "x"), y=self._batch(y, "y"),
                          lr=np.asarray(lr, np.float32), **self._masks(keep, len(x)))
        return TrainStep(float(out["loss"]), int(out["tokens"]))

    def _masks(self, keep: Sequence[np.ndarray], rows: int) -> dict[str, np.ndarray]:
        placement = self.dropout.placement if self.dropout is not None else ()
        if len(keep) != len(placement):
            raise ValueError(f"keep: this plan's dropout takes {len(placement)} mask(s) ({', '.join(placement)}), "
                             f"got {len(keep)}")
        out = {}
        for name, mask in zip(placement, keep):
            mask = np.asarray(mask, np.float32)
            if mask.shape != (rows, *self._mask_shape) or not np.isin(mask, (0.0, 1.0)).all():
                raise ValueError(f"keep_{name}: expected 0/1 values of shape {(rows, *self._mask_shape)}, "
                                 f"got {mask.shape}")
            out[f"keep_{name}"] = pad_batch(mask, self.batch_size)
        return out

    def train(self, x: np.ndarray, y: np.ndarray, lr: float, keep: Sequence[np.ndarray] = ()) -> float:
        """One SGD step; returns the batch's loss before the step."""
        return self.train_step(x, y, lr, keep).loss

    def train_windows(self, windows: np.ndarray, lr: float, keep: Sequence[np.ndarray] = ()) -> TrainStep:
        """One SGD step on windows [n, seq_len + 1] (x = [:, :-1], y = [:, 1:]), as the corpus stores them."""
        windows = np.asarray(windows)
        return self.train_step(windows[:, :-1], windows[:, 1:], lr, keep)

    def personalize_windows(self, windows: np.ndarray, lr: float) -> TrainStep:
        """One SGD step on windows [n, seq_len + 1] that moves only the plan's `personal_layers`."""
        windows = np.asarray(windows)
        x, y = self._batch(windows[:, :-1], "x"), self._batch(windows[:, 1:], "y")
        out = self._personalize(x=x, y=y, lr=np.asarray(lr, np.float32))
        return TrainStep(float(out["loss"]), int(out["tokens"]))

    def next_probs(self, token_ids: Sequence[int]) -> np.ndarray:
        """The next-token distribution [V] after `token_ids` (starting with <bos>) with the current weights."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)[-self.seq_len:]
        if ids.size == 0:
            raise ValueError("token_ids: the context needs at least one token (<bos>)")
        _check_tokens(ids, self._vocab_size, "token_ids")
        tokens = np.zeros((1, self.seq_len), np.int32)
        tokens[0, :ids.size] = ids
        return np.array(self._next_probs(tokens=tokens, length=np.asarray(ids.size, np.int32))["probs"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Next-token logits [n, seq_len, V] float32 for any number of rows of token ids."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.seq_len:
            raise ValueError(f"x: expected [n, {self.seq_len}] token ids, got shape {x.shape}")
        chunks = [self._infer(x=self._batch(x[i:i + self.batch_size], "x"))["logits"]
                  [:len(x[i:i + self.batch_size])] for i in range(0, len(x), self.batch_size)]
        if not chunks:
            return np.zeros((0, self.seq_len, self._vocab_size), np.float32)
        return np.concatenate(chunks)

    def get_weights(self) -> np.ndarray:
        """The current weights, float32 [layout.size] in `manifest.weight_layout` order."""
        return np.array(self._get()["flat"], np.float32)

    def set_weights(self, flat: np.ndarray) -> None:
        """Replace every weight (e.g. with the server's model before a round)."""
        flat = np.asarray(flat)
        if flat.shape != (self.layout.size,) or not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"flat weights: expected float [{self.layout.size}], got "
                             f"{flat.dtype} {flat.shape}")
        self._set(flat=flat.astype(np.float32, copy=False))


class AppModel:
    """The quantized suggestion model: context token ids → top-k (id, probability)."""

    def __init__(self, manifest: Manifest, vocab: Vocabulary, model: bytes,
                 source: Path, num_threads: int | None = None):
        self.manifest, self.vocab, self.source = manifest, vocab, source
        self.k: int = manifest.k
        self.seq_len: int = manifest.seq_len
        self._vocab_size = int(manifest.model_config["vocab_size"])
        interpreter = _interpreter(model, manifest, source, num_threads)
        self._suggest = interpreter.get_signature_runner("suggest")
        self._distribution = interpreter.get_signature_runner("distribution")
        self._interpreter = interpreter
        self._tokens = np.zeros((1, self.seq_len), np.int32)

    def suggest(self, token_ids: Sequence[int]) -> list[tuple[int, float]]:
        """The k most probable next tokens after `token_ids` (which start with <bos>), best first.

        Probabilities are the model's softmax over the whole vocabulary; pad,
        bos and oov are never among the suggestions.
        """
        out = self._suggest(**self._inputs(token_ids))
        return [(int(i), float(p)) for i, p in zip(out["ids"], out["probs"])]

    def probabilities(self, token_ids: Sequence[int]) -> np.ndarray:
        """The whole next-token distribution [V] after `token_ids` (pad/bos/oov included)."""
        return np.array(self._distribution(**self._inputs(token_ids))["probs"])

    def _inputs(self, token_ids: Sequence[int]) -> dict:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)[-self.seq_len:]
        if ids.size == 0:
            raise ValueError("token_ids: the context needs at least one token (<bos>)")
        _check_tokens(ids, self._vocab_size, "token_ids")
        self._tokens[:] = 0
        self._tokens[0, :ids.size] = ids
        return {"tokens": self._tokens, "length": np.asarray(ids.size, np.int32)}


def load_plan(manifest_path: str | Path, expected_vocab_sha256: str | None = None,
              num_threads: int | None = None) -> TrainingPlan:
    """Verify and load a training plan (see `manifest.load_verified` for the errors)."""
    verified = load_verified(manifest_path, TRAINING_PLAN, expected_vocab_sha256)
    return TrainingPlan(verified.manifest, verified.vocab, verified.model, Path(manifest_path),
                        num_threads)


def load_app_model(manifest_path: str | Path, expected_vocab_sha256: str | None = None,
                   num_threads: int | None = None) -> AppModel:
    """Verify and load an app model (see `manifest.load_verified` for the errors)."""
    verified = load_verified(manifest_path, APP_MODEL, expected_vocab_sha256)
    return AppModel(verified.manifest, verified.vocab, verified.model, Path(manifest_path),
                    num_threads)
