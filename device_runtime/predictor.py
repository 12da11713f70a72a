"""Keyboard suggestions from the latest published app model, swapped in atomically.

The keyboard calls `Predictor.suggest(context)` on every key press. A newer
published model is downloaded, verified and loaded completely in the
background (`install`), and only then made current by a single reference
assignment; a `suggest` call holds the model it started with, so it never sees
a half-loaded one. Each call takes a lock of its own model because a LiteRT
interpreter is not safe to invoke from two threads at once.
"""
from __future__ import annotations

import threading
from pathlib import Path

from models.text import BOS_ID, split_sentences
from tflite_export.reader import AppModel, load_app_model


class _Loaded:
    def __init__(self, model: AppModel, version: int):
        self.model, self.version = model, version
        self.lock = threading.Lock()


class Predictor:
    """Thread-safe next-word suggestions; `install` swaps in a new model version."""

    def __init__(self) -> None:
        self._current: _Loaded | None = None
        self._install_lock = threading.Lock()

    @property
    def version(self) -> int | None:
        current = self._current
        return current.version if current else None

    def install(self, manifest_path: str | Path) -> int:
        """Load and verify an app model (its manifest checks every hash), then swap it in."""
        model = load_app_model(manifest_path)
        version = int(model.manifest.model_version)
        with self._install_lock:
            if self._current is None or version >= self._current.version:
                self._current = _Loaded(model, version)   # the atomic swap
        return version

    def suggest(self, context: str, k: int = 3) -> list[tuple[str, float]]:
        """Up to k (word, probability) suggestions for the word after `context`.

        The context is tokenized like training text; only its last sentence
        matters, because the model starts every sentence from <bos>.
        """
        loaded = self._current
        if loaded is None:
            return []
        sentences = split_sentences(context)
        ends_sentence = context.rstrip()[-1:] in ".!?;:" if context.strip() else True
        last = [] if ends_sentence or not sentences else sentences[-1]
        vocab = loaded.model.vocab
        ids = [BOS_ID] + vocab.encode(last)
        with loaded.lock:
            top = loaded.model.suggest(ids)
        return [(vocab.tokens[i], p) for i, p in top[:k]]

    def suggest_ids(self, ids: list[int]) -> list[tuple[int, float]]:
        loaded = self._current
        if loaded is None:
            return []
        with loaded.lock:
            return loaded.model.suggest(ids)


