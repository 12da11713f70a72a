"""Keyboard suggestions from the latest published app model, swapped in atomically.

The keyboard calls `Predictor.suggest(context)` on every key press. A newer
published model is downloaded, verified and loaded completely first
(`install`), and only then made current by a single reference assignment; a
`suggest` call reads that reference once and uses the model it got to the
end, so it never sees a half-loaded model or a mix of two. Each call takes a
lock of its own model because a LiteRT interpreter is not safe to invoke from
two threads at once (two models never share a lock, so a swap never waits for
suggestions, nor they for it).

Versions only move forward, so two installs racing cannot leave the older
one current; the one exception is the server rolling its published model
back, which `install(..., allow_older=True)` follows.

A personal model (device_runtime.personalization) made from the current
version answers instead of the app model; one made from another version
(or in another vocabulary) is ignored until it is made again.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from contract.model.text import BOS_ID, split_sentences
from contract.artifacts.errors import ArtifactError
from tflite_export.reader import AppModel, load_app_model

MANIFEST_NAME = "app.manifest.json"
log = logging.getLogger(__name__)


class _Loaded:
    def __init__(self, model: AppModel, version: int):
        self.model, self.version = model, version
        self.lock = threading.Lock()

    def suggest(self, ids: list[int]) -> list[tuple[int, float]]:
        with self.lock:
            return self.model.suggest(ids)


class Predictor:
    """Thread-safe next-word suggestions; `install` swaps in a new model version."""

    def __init__(self) -> None:
        self._current: _Loaded | None = None
        self._personal = None          # (PersonalModel, its lock), or None
        self._install_lock = threading.Lock()

    def set_personal(self, model) -> None:
        """Serve suggestions from `model` (a PersonalModel) while it matches the current version; None: stop."""
        self._personal = (model, threading.Lock()) if model is not None else None

    @property
    def personal_active(self) -> bool:
        """Whether suggestions come from the personal model now."""
        return self._personal_for(self._current) is not None

    def _personal_for(self, loaded: "_Loaded | None"):
        personal = self._personal
        if personal is None or loaded is None:
            return None
        model = personal[0]
        if model.base_version != loaded.version or model.vocab_sha256 != loaded.model.vocab.sha256:
            return None
        return personal

    @property
    def version(self) -> int | None:
        current = self._current
        return current.version if current else None

    def install(self, manifest_path: str | Path, *, allow_older: bool = False) -> int | None:
        """Load and verify an app model (its manifest checks every hash), then swap it in.

        Returns the version current afterwards: the new one, or the newer one
        already installed (an older model is loaded but not swapped in unless
        `allow_older`).
        """
        model = load_app_model(manifest_path)
        version = int(model.manifest.model_version)
        with self._install_lock:
            if self._current is None or allow_older or version >= self._current.version:
                self._current = _Loaded(model, version)
            return self._current.version

    def install_latest(self, app_dir: str | Path) -> int | None:
        """Install the newest model under `app_dir/<version>/` (what a restarted keyboard does).

        A directory whose files fail verification, or whose manifest is of a schema version
        this phone does not read, is skipped (and logged) for the next older one.
        """
        candidates = sorted((p for p in Path(app_dir).glob(f"*/{MANIFEST_NAME}")
                             if p.parent.name.isdigit()),
                            key=lambda p: int(p.parent.name), reverse=True)
        for manifest in candidates:
            try:
                return self.install(manifest)
            except (ArtifactError, OSError, ValueError) as e:   # a manifest newer than this phone reads, too
                log.warning("app model %s not installed: %s", manifest.parent.name, e)
        return self.version

    def suggest(self, context: str, k: int = 3) -> list[tuple[str, float]]:
        """Up to k (word, probability) suggestions for the word after `context`, best first.

        The context is tokenized like training text; only its last sentence
        matters, because the model starts every sentence from <bos>. At most
        the model's own k (fixed at export) are returned; none before a model
        is installed.
        """
        loaded = self._current
        if loaded is None:
            return []
        sentences = split_sentences(context)
        ends_sentence = context.rstrip()[-1:] in ".!?;:" if context.strip() else True
        last = [] if ends_sentence or not sentences else sentences[-1]
        vocab = loaded.model.vocab
        top = self._suggest(loaded, [BOS_ID] + vocab.encode(last))
        return [(vocab.tokens[i], p) for i, p in top[:k]]

    def suggest_ids(self, ids: list[int]) -> list[tuple[int, float]]:
        """Suggestions for token ids (starting with <bos>) from the personal model, else the app model."""
        loaded = self._current
        return self._suggest(loaded, ids) if loaded is not None else []

    def _suggest(self, loaded: _Loaded, ids: list[int]) -> list[tuple[int, float]]:
        personal = self._personal_for(loaded)
        if personal is None:
            return loaded.suggest(ids)
        model, lock = personal
        with loaded.lock, lock:
            return model.suggest(ids, loaded.model)[:loaded.model.k]

