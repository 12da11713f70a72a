"""The personal cache: a user's word counts, mixed into the model's distribution, and scored. TF-free.

    p(w | context) = (1 − λ) · p_model(w | context) + λ · p_cache(w | previous word),
    p_cache(w | v) = (c(v, w) + κ · c(w) / N) / (c(v) + κ),

the unigram/bigram cache of the keyboard literature (Kuhn and De Mori 1990),
λ = `PersonalSpec.cache_weight`, κ = `cache_smoothing`. It never leaves the
phone. contract.tasks.personal re-exports everything here.

`mix` gives one position's distribution (what a keyboard suggests from).
Scoring many positions (`window_scores`, and a sweep over λ and κ) does not
build a V-sized mix per position: the cache only moves words it holds (its
*support*), and outside it the mix is (1 − λ) · p_model, whose order λ
cannot change. So the model's distributions are reduced once (`reduce`) to
the support's probabilities and the best three suggestible words outside it,
and `scores` ranks the target among those for any λ and κ — the same
floating-point operations as `mix`, so the same hits and log-likelihood.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from contract.model.metrics import Hits, suggestions
from contract.model.text import NEVER_SUGGEST, PAD_ID

_BANNED = np.array(sorted(NEVER_SUGGEST))


class PersonalCache:
    """Unigram and bigram counts of a user's own words (targets of its windows; never pad/bos/oov)."""

    def __init__(self, unigrams: dict[int, int], bigrams: dict[int, dict[int, int]]):
        self.unigrams, self.bigrams = unigrams, bigrams
        self.total = sum(unigrams.values())
        # made once: a suggestion then only adds its previous word's bigrams
        self._ids = np.fromiter(unigrams, np.int64, len(unigrams))
        self._counts = np.fromiter(unigrams.values(), np.float64, len(unigrams))
        self._where = {w: i for i, w in enumerate(self._ids.tolist())}

    @classmethod
    def from_windows(cls, windows: np.ndarray) -> "PersonalCache":
        windows = np.asarray(windows)
        x, y = windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)
        keep = ~np.isin(y, list(NEVER_SUGGEST))
        unigrams: dict[int, int] = {}
        bigrams: dict[int, dict[int, int]] = {}
        for prev, word in zip(x[keep].tolist(), y[keep].tolist()):
            unigrams[word] = unigrams.get(word, 0) + 1
            row = bigrams.setdefault(prev, {})
            row[word] = row.get(word, 0) + 1
        return cls(unigrams, bigrams)

    def distribution(self, prev: int, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) of p_cache(· | prev); empty for an empty cache."""
        if not self.total:
            return np.zeros(0, np.int64), np.zeros(0)
        p = self._counts * (smoothing / self.total)
        row = self.bigrams.get(int(prev), {})
        for w, c in row.items():
            p[self._where[w]] += c
        return self._ids, p / (sum(row.values()) + smoothing)

    def to_json(self) -> dict:
        return {"unigrams": {str(k): v for k, v in self.unigrams.items()},
                "bigrams": {str(k): {str(w): c for w, c in row.items()} for k, row in self.bigrams.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "PersonalCache":
        return cls({int(k): int(v) for k, v in data["unigrams"].items()},
                   {int(k): {int(w): int(c) for w, c in row.items()} for k, row in data["bigrams"].items()})


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits [..., V] in float64 (pad/bos/oov keep theirs: `suggestions` drops them)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def mix(probs: np.ndarray, prev: int, cache: PersonalCache | None, spec) -> np.ndarray:
    """The personal next-word distribution [V] from the model's `probs` [V] after word `prev` (`spec`: a
    PersonalSpec, or anything with cache_weight and cache_smoothing)."""
    if cache is None or spec.cache_weight == 0 or not cache.total:
        return probs
    ids, p = cache.distribution(prev, spec.cache_smoothing)
    out = (1 - spec.cache_weight) * np.asarray(probs, np.float64)
    out[ids] += spec.cache_weight * p
    return out


@dataclasses.dataclass
class Reduced:
    """A model's distributions at n positions, reduced to what scoring any mix with one cache needs."""

    targets: np.ndarray        # [n] the typed words
    support: np.ndarray        # [m] the cache's words, ascending
    p_support: np.ndarray      # [n, m] the model's probabilities of them
    top_ids: np.ndarray        # [n, 3] the model's best three suggestible words outside the support
    top_p: np.ndarray          # [n, 3]
    p_target: np.ndarray       # [n]
    unigrams: np.ndarray       # [m] the cache's counts
    total: int                 # N, their sum
    bigrams: np.ndarray        # [n, m] c(v, ·) of each position's previous word v
    context: np.ndarray        # [n] c(v)


def reduce(probs: np.ndarray, prev: np.ndarray, targets: np.ndarray, cache: PersonalCache) -> Reduced:
    """Reduce `probs` [n, V] at positions with previous words `prev` and `targets` [n] for `cache`."""
    probs = np.asarray(probs, np.float64)
    support = np.array(sorted(cache.unigrams), np.int64)
    column = {w: i for i, w in enumerate(support.tolist())}
    outside = probs.copy()
    outside[:, support] = -np.inf
    top = suggestions(outside, k=3) if len(probs) else np.zeros((0, 3), np.int64)
    rows = np.zeros((len(probs), len(support)))
    for v in np.unique(prev).tolist():
        for w, c in cache.bigrams.get(v, {}).items():
            rows[prev == v, column[w]] = c
    unigrams = np.array([cache.unigrams[w] for w in support.tolist()], np.float64)
    return Reduced(np.asarray(targets), support, probs[:, support], top, np.take_along_axis(probs, top, 1),
                   probs[np.arange(len(probs)), targets], unigrams, cache.total, rows, rows.sum(axis=1))


def scores(r: Reduced, cache_weight: float, smoothing: float) -> tuple[Hits, float]:
    """Hits and Σ log p(target) of the mix with weight λ and smoothing κ at the reduced positions."""
    n, lam = len(r.targets), cache_weight
    if not n:
        return Hits(), 0.0
    cache = (r.unigrams * (smoothing / r.total) + r.bigrams) / (r.context + smoothing)[:, None]
    mixed = (1 - lam) * r.p_support + lam * cache                                   # [n, m]
    others = (1 - lam) * r.top_p                                                    # [n, 3]
    index = np.searchsorted(r.support, r.targets)
    held = (index < len(r.support)) & (r.support[np.minimum(index, len(r.support) - 1)] == r.targets)
    score = np.where(held, mixed[np.arange(n), np.minimum(index, len(r.support) - 1)], (1 - lam) * r.p_target)
    y = r.targets[:, None]
    rank = ((mixed > score[:, None]) | ((mixed == score[:, None]) & (r.support[None, :] < y))).sum(axis=1)
    rank += ((others > score[:, None]) | ((others == score[:, None]) & (r.top_ids < y))).sum(axis=1)
    # a target neither held nor among the best three outside is outranked by those three
    rank = np.where(held | (r.top_ids == y).any(axis=1), rank, np.maximum(rank, 3))
    ok = ~np.isin(r.targets, _BANNED)
    loglik = float(np.log(np.maximum(score, 1e-300)).sum())
    return Hits(int(((rank == 0) & ok).sum()), int(((rank < 3) & ok).sum()), n), loglik


def positions(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-pad positions of `windows` [n, L + 1]: (mask [n, L], previous words, targets)."""
    windows = np.asarray(windows)
    x, y = windows[:, :-1], windows[:, 1:]
    mask = y != PAD_ID
    return mask, x[mask], y[mask]


def plain_scores(probs: np.ndarray, targets: np.ndarray) -> tuple[Hits, float]:
    """Hits and Σ log p(target) of the distributions `probs` [n, V] themselves (no cache)."""
    if not len(targets):
        return Hits(), 0.0
    match = suggestions(probs, k=3) == np.asarray(targets)[:, None]
    loglik = float(np.log(np.maximum(probs[np.arange(len(probs)), targets], 1e-300)).sum())
    return Hits(int(match[:, 0].sum()), int(match.any(axis=1).sum()), len(targets)), loglik


def window_scores(logits: np.ndarray, windows: np.ndarray, cache: PersonalCache | None,
                  spec) -> tuple[Hits, float]:
    """contract.model.metrics hits of the model's `logits` [n, L, V] on `windows` [n, L + 1], mixed with `cache`
    (None: the model alone), and Σ log p(target) over the non-pad positions (an oov target counts its own
    probability)."""
    mask, prev, targets = positions(windows)
    probs = softmax(np.asarray(logits)[mask])
    if cache is not None and spec.cache_weight and cache.total:
        return scores(reduce(probs, prev, targets, cache), spec.cache_weight, spec.cache_smoothing)
    return plain_scores(probs, targets)
