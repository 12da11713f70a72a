"""The shipped predictor — what a keyboard suggests with — scored as a keyboard runs it.

A keyboard suggests from the app model's next-word distribution, mixed with
what the phone learns from its own user as they type: the typing cache of
contract.tasks.personal (unigram and bigram counts of the user's words, the
same `mix` a personal model uses) and, optionally, a global n-gram that the
fleet could build under a device threshold (`ThresholdedNgram`):

    p = (1 − λ) · [(1 − μ) · p_app + μ · p_ngram] + λ · p_cache

Scoring (`stream_hits`): each held-out user's windows in typing order; at
every position the suggestions come from the app model at that context and
a cache counted from the user's text *before* that window (a phone adds a
sentence to its cache once it is committed), so nothing is adapted on text
at or after the scored position. Hits follow contract.model.metrics.

Choosing λ, κ and μ (`choose`): a grid, scored the same way on held-back text
of *training* users only — never on the held-out users the row is measured
on. The network has trained on that text, so it looks better there than on
new users, and the mixture weights it gives are, if anything, too small for
them (a conservative choice). The n-gram is fitted without the users it is
tuned on (cross-fitting), then refitted on every training user.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from contract.model.metrics import Hits, suggestions
from contract.model.text import NEVER_SUGGEST, PAD_ID
from contract.tasks.personal import PersonalCache, PersonalSpec, mix

ModelProbs = Callable[[np.ndarray], np.ndarray]   # one window [L + 1] → next-token probabilities [L, V]


@dataclasses.dataclass(frozen=True)
class PredictorSpec:
    """How the keyboard mixes its parts (chosen on training users' text: `choose`)."""

    cache_weight: float = 0.0      # λ: the typing cache's share (0: no cache)
    cache_smoothing: float = 1.0   # κ: how fast a previous word's bigrams take over from its unigrams
    ngram_weight: float = 0.0      # μ: the device-thresholded n-gram's share of the rest (0: none)

    def personal(self) -> PersonalSpec:
        return PersonalSpec(cache_weight=self.cache_weight, cache_smoothing=self.cache_smoothing)


class TypingCache:
    """The counts a phone adds a committed sentence to (the same counts as PersonalCache.from_windows)."""

    def __init__(self) -> None:
        self.unigrams: dict[int, int] = {}
        self.bigrams: dict[int, dict[int, int]] = {}

    def add(self, window: np.ndarray) -> None:
        x, y = np.asarray(window)[:-1], np.asarray(window)[1:]
        for prev, word in zip(x.tolist(), y.tolist()):
            if word in NEVER_SUGGEST:
                continue
            self.unigrams[word] = self.unigrams.get(word, 0) + 1
            row = self.bigrams.setdefault(prev, {})
            row[word] = row.get(word, 0) + 1

    def snapshot(self) -> PersonalCache | None:
        """The cache as contract.tasks.personal reads it (None while empty)."""
        if not self.unigrams:
            return None
        return PersonalCache(dict(self.unigrams), {v: dict(row) for v, row in self.bigrams.items()})


def stream_hits(model_probs: ModelProbs, windows: np.ndarray, specs: list[PredictorSpec],
                ngram_probs: ModelProbs | None = None) -> list[Hits]:
    """One user's hits for each of `specs`, over their windows in typing order (module docstring).

    The model (and n-gram) run once per window; every spec is scored on the same distributions."""
    out = [Hits() for _ in specs]
    cache = TypingCache()
    for window in np.asarray(windows):
        x, y = window[:-1], window[1:]
        positions = np.flatnonzero(y != PAD_ID)
        if len(positions):
            model = model_probs(window)
            ngram = ngram_probs(window) if ngram_probs is not None and any(s.ngram_weight for s in specs) else None
            snapshot = cache.snapshot()
            for i, spec in enumerate(specs):
                out[i] = out[i] + _window_hits(model, ngram, snapshot, spec, x, y, positions)
        cache.add(window)
    return out


def _window_hits(model: np.ndarray, ngram: np.ndarray | None, cache: PersonalCache | None, spec: PredictorSpec,
                 x: np.ndarray, y: np.ndarray, positions: np.ndarray) -> Hits:
    personal = spec.personal()
    mixed = []
    for t in positions:
        p = np.asarray(model[t], np.float64)
        if spec.ngram_weight:
            p = (1.0 - spec.ngram_weight) * p + spec.ngram_weight * ngram[t]
        mixed.append(mix(p, int(x[t]), cache, personal))
    top = suggestions(np.stack(mixed), k=3)
    match = top == y[positions][:, None]
    return Hits(int(match[:, 0].sum()), int(match.any(axis=1).sum()), len(positions))


def evaluate(model_probs: ModelProbs, users: Mapping[str, np.ndarray], specs: list[PredictorSpec],
             ngram_probs: ModelProbs | None = None, desc: str = "predictor") -> list[Hits]:
    """`stream_hits` summed over `users` (micro-averaged: hits and positions add up)."""
    total = [Hits() for _ in specs]
    for user in tqdm(sorted(users), desc=desc, unit="user"):
        total = [a + b for a, b in zip(total, stream_hits(model_probs, users[user], specs, ngram_probs))]
    return total


def grid(cache_weights: Iterable[float], smoothings: Iterable[float],
         ngram_weights: Iterable[float] = (0.0,)) -> list[PredictorSpec]:
    return [PredictorSpec(c, s, n) for c, s, n in itertools.product(cache_weights, smoothings, ngram_weights)
            if c or s == next(iter(smoothings))]      # κ means nothing without a cache


def choose(model_probs: ModelProbs, tuning_users: Mapping[str, np.ndarray], specs: list[PredictorSpec],
           ngram_probs: ModelProbs | None = None) -> tuple[PredictorSpec, list[dict]]:
    """The spec with the most top-1 hits on `tuning_users` (training users' text; ties: top-3, then the
    simpler spec first), and every spec's figures."""
    hits = evaluate(model_probs, tuning_users, specs, ngram_probs, desc="choosing the predictor (training users)")
    table = [{**dataclasses.asdict(s), **h.as_dict()} for s, h in zip(specs, hits)]
    best = max(range(len(specs)), key=lambda i: (hits[i].top1, hits[i].top3, -i))
    return specs[best], table


@dataclasses.dataclass(frozen=True)
class Selection:
    """How the predictor is chosen: on `tuning_users` training users, over the grid, with the n-gram route."""

    tuning_users: int = 90
    seed: int = 0
    cache_weights: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
    smoothings: tuple[float, ...] = (0.5, 1.0, 2.0)
    ngram_weights: tuple[float, ...] = (0.0, 0.15, 0.3)
    ngram_min_devices: int = 5       # trigrams typed by at least this many users (0: no n-gram route)


def select_and_score(model_probs: ModelProbs, train: Mapping[str, np.ndarray], heldout: Mapping[str, np.ndarray],
                     vocab_size: int, sel: Selection = Selection()) -> dict:
    """Choose the predictor on training users' text, then score it (and the model alone) on `heldout`.

    Only `train` is read while choosing; `heldout` is read once, after the choice, to score it."""
    rng = np.random.default_rng(sel.seed)
    train_ids = sorted(train)
    tuning = {u: train[u] for u in sorted(rng.choice(train_ids, min(sel.tuning_users, len(train_ids)),
                                                      replace=False).tolist())}
    ngram = None
    if sel.ngram_min_devices:
        # cross-fitting: the n-gram that chooses its weight has not seen the tuning users' text
        held = ThresholdedNgram(vocab_size, sel.ngram_min_devices).fit(
            {u: w for u, w in train.items() if u not in tuning})
        best, table = choose(model_probs, tuning, grid(sel.cache_weights, sel.smoothings, sel.ngram_weights),
                             held.probs)
        if best.ngram_weight:
            ngram = ThresholdedNgram(vocab_size, sel.ngram_min_devices).fit(train)
    else:
        best, table = choose(model_probs, tuning, grid(sel.cache_weights, sel.smoothings))
    alone, mine = evaluate(model_probs, heldout, [PredictorSpec(), best], ngram.probs if ngram else None,
                           desc="shipped predictor (held-out users)")
    return {"spec": best, "hits": mine, "model_alone": alone, "selection": table,
            "tuning_users": sorted(tuning), "tuning_windows": int(sum(len(w) for w in tuning.values())),
            "ngram": None if ngram is None else {"min_devices": ngram.min_devices,
                                                 "trigram_types_kept": ngram.kept_types,
                                                 "trigram_types": ngram.types}}


def app_model_probs(app) -> ModelProbs:
    """The app model (tflite_export.reader.AppModel) at every position of a window: its `distribution`
    after the window's first t + 1 tokens, as the keyboard calls it (pad positions left zero)."""
    def probs(window: np.ndarray) -> np.ndarray:
        window = np.asarray(window)
        out = np.zeros((len(window) - 1, app.vocab.__len__()), np.float64)
        for t in np.flatnonzero(window[1:] != PAD_ID):
            out[t] = app.probabilities(window[:t + 1])
        return out
    return probs


class ThresholdedNgram:
    """A Kneser–Ney trigram built only from trigrams that at least `min_devices` users typed.

    What a fleet could build without any rarer n-gram reaching the server: a trigram counts (with its
    summed count) only if that many devices typed it; the lower orders come from the kept trigrams
    (Kneser–Ney's continuation counts), so nothing rarer enters through them either."""

    def __init__(self, vocab_size: int, min_devices: int):
        if min_devices < 1:
            raise ValueError("min_devices must be >= 1")
        self.vocab_size, self.min_devices = vocab_size, min_devices
        self.kept_types = self.types = 0
        self.model = None

    def fit(self, users: Mapping[str, np.ndarray]) -> "ThresholdedNgram":
        from models.ngram import KneserNeyTrigram

        self.model = KneserNeyTrigram(self.vocab_size)
        per_user = [np.unique(self.model.trigram_keys(users[u]), return_counts=True) for u in sorted(users)]
        keys, counts = (np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in zip(*per_user)) \
            if per_user else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        distinct, first, devices = np.unique(keys, return_inverse=True, return_counts=True)
        summed = np.bincount(first, weights=counts, minlength=len(distinct)).astype(np.int64)
        kept = devices >= self.min_devices
        self.kept_types, self.types = int(kept.sum()), len(distinct)
        self.model.fit_counts(distinct[kept], summed[kept])
        return self

    def probs(self, window: np.ndarray) -> np.ndarray:
        return self.model.scores(np.asarray(window)[None, :])[0]
