"""The quality metric every Nightjar number is reported in. TensorFlow-free.

Definition (used by the TFF model, the n-gram baseline, the phones' evaluation
tasks and every benchmark):

* A *position* is one (context, target) pair of a sequence whose target is not
  the pad token. End-of-sentence and out-of-vocabulary targets count.
* The model's *suggestions* at a position are its k highest-scoring tokens
  after removing pad, bos and oov (a keyboard never offers those); ties are
  broken towards the lower token id
  (among tokens tied exactly at the k-th place, any one may be chosen).
* top-1 accuracy = positions whose target is the first suggestion / positions.
* top-3 recall   = positions whose target is among the first three
  suggestions / positions. (An oov target is therefore always a miss.)
* Aggregates are micro-averages: hits and positions are summed over all
  sequences of all clients, then divided once.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from contract.model.text import NEVER_SUGGEST, PAD_ID


@dataclasses.dataclass
class Hits:
    """Summable counts behind top-1 accuracy and top-3 recall."""

    top1: int = 0
    top3: int = 0
    positions: int = 0

    def __add__(self, other: "Hits") -> "Hits":
        return Hits(self.top1 + other.top1, self.top3 + other.top3,
                    self.positions + other.positions)

    def as_dict(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {"top1": self.top1 / n, "top3": self.top3 / n,
                "positions": self.positions}


def suggestions(scores: np.ndarray, k: int = 3) -> np.ndarray:
    """Top-k suggestion ids, best first, never pad/bos/oov.

    scores: [..., V] logits or probabilities. Returns [..., k] int64.
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    s[..., list(NEVER_SUGGEST)] = -np.inf
    # argpartition finds the k best in O(V); only those k are then sorted, by
    # descending score and then ascending id (a stable sort of ids in order).
    part = np.sort(np.argpartition(-s, k - 1, axis=-1)[..., :k], axis=-1)
    order = np.argsort(-np.take_along_axis(s, part, axis=-1), axis=-1,
                       kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def count_hits(scores: np.ndarray, targets: np.ndarray) -> Hits:
    """Hits of the suggestions for `scores` [..., V] against `targets` [...]."""
    targets = np.asarray(targets)
    mask = targets != PAD_ID
    top = suggestions(scores, k=3)
    match = top == targets[..., None]
    return Hits(top1=int(np.sum(match[..., 0] & mask)),
                top3=int(np.sum(np.any(match, axis=-1) & mask)),
                positions=int(np.sum(mask)))
