"""Interpolated Kneser–Ney trigram model: the n-gram baseline for the CIFG-LSTM.

Gboard's federated next-word paper measures its LSTM against an n-gram model;
this is Nightjar's equivalent, trained on the same windows as the LSTM
(contract.model.text.to_sequences) and scored with the same metric (contract.model.metrics).

The model is interpolated Kneser–Ney (Chen & Goodman 1998) with one discount
per order::

    p3(w|u,v) = max(c(u,v,w) - D3, 0) / c(u,v,.)
                + D3 * N1+(u,v,.) / c(u,v,.) * p2(w|v)       (p2 if c(u,v,.) = 0)
    p2(w|v)   = max(N1+(.,v,w) - D2, 0) / N1+(.,v,.)
                + D2 * |{w: N1+(.,v,w) > 0}| / N1+(.,v,.) * p1(w)  (p1 if unseen)
    p1(w)     = max(N1+(.,w) - D1, 0) / N1+(.,.)
                + D1 * |{w: N1+(.,w) > 0}| / N1+(.,.) / V

Lower orders use continuation counts (how many distinct words precede), which
is what makes Kneser–Ney better than absolute discounting at backing off. The
uniform 1/V floor covers all V ids, so every token — even one never seen in
training — has non-zero probability, and each distribution sums to 1.

Discounts: D_n = n1 / (n1 + 2 n2) (Ney et al. 1994), from the count-of-counts
of the counts used at that order (raw trigram counts for D3, continuation counts
for D2 and D1). This is plain, not modified, KN (one D per order instead of
D1/D2/D3+): fewer parameters, and every probability can be checked by hand.

Window start: the word before x[0] is unknown (the window starts a sentence
with bos, or continues a long one). It is the marker id ``V`` ("no token"),
which acts as an ordinary left word: (none, bos) is then exactly the
sentence-start context, and at lower orders the marker is one more distinct
left context. Pad is never a target and, since it only follows eos, never
context of a counted target.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from contract.model.metrics import Hits, count_hits
from contract.model.text import PAD_ID

Windows = np.ndarray | Iterable[np.ndarray]


def _as_arrays(windows: Windows) -> list[np.ndarray]:
    if isinstance(windows, np.ndarray):
        return [windows]
    return [np.asarray(w) for w in windows]


def _ney_discount(counts: np.ndarray) -> float:
    """n1 / (n1 + 2 n2); 0.5 when no count is 1, where the estimate would be 0
    and leave unseen words without probability."""
    n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
    return n1 / (n1 + 2 * n2) if n1 else 0.5


class _Level:
    """One order's discounted distributions, stored sparsely (CSR by context).

    For each seen context key: its words, their discounted probability
    max(c - D, 0) / total, and the weight D * types / total that the next
    lower order gets. An unseen context gives the lower order weight 1.
    """

    def __init__(self, contexts: np.ndarray, words: np.ndarray,
                 counts: np.ndarray, discount: float):
        # Inputs are sorted by (context, word), each pair once.
        self.keys, start = np.unique(contexts, return_index=True)
        self.indptr = np.append(start, len(contexts))
        self.words = words
        types = np.diff(self.indptr)
        total = np.add.reduceat(counts, start).astype(np.float64) if len(start) else np.zeros(0)
        self.mass = np.maximum(counts - discount, 0) / np.repeat(total, types)
        self.backoff = discount * types / total

    def apply(self, probs: np.ndarray, contexts: np.ndarray) -> None:
        """Turn rows of the lower order's probabilities [C, V] into this order's, in place."""
        if len(self.keys) == 0:
            return
        idx = np.minimum(np.searchsorted(self.keys, contexts), len(self.keys) - 1)
        found = self.keys[idx] == contexts
        probs *= np.where(found, self.backoff[idx], 1.0)[:, None]
        rows = np.flatnonzero(found)
        starts = self.indptr[idx[rows]]
        lengths = self.indptr[idx[rows] + 1] - starts
        entries = (np.arange(lengths.sum())
                   - np.repeat(np.cumsum(lengths) - lengths, lengths)
                   + np.repeat(starts, lengths))
        probs[np.repeat(rows, lengths), self.words[entries]] += self.mass[entries]


class KneserNeyTrigram:
    """Interpolated Kneser–Ney trigram model over token ids ``0 .. V-1``."""

    # Rows of targets per scored context in evaluate(): frequent contexts are
    # split into rows of this many targets so target memory stays bounded.
    _TARGETS_PER_ROW = 16

    def __init__(self, vocab_size: int, discount: float | None = None):
        """`discount` None estimates D per order from count-of-counts; a float
        in (0, 1] is used for all three orders (above 1 the mass would exceed 1)."""
        if discount is not None and not 0 < discount <= 1:
            raise ValueError("discount must be in (0, 1]")
        self.vocab_size = vocab_size
        self.discount = discount
        self.no_token = vocab_size  # the left word before a window's first token
        self.discounts: tuple[float, float, float] | None = None  # (D1, D2, D3)
        self._unigram = np.full(vocab_size, 1.0 / vocab_size)
        self._bigram: _Level | None = None
        self._trigram: _Level | None = None

    def _events(self, windows: Windows, keep_pad: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, w) of every position; only non-pad targets unless `keep_pad`."""
        us, vs, ws = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for arr in _as_arrays(windows):
            arr = np.asarray(arr, dtype=np.int64)
            if arr.size == 0:
                continue
            if arr.min() < 0 or arr.max() >= self.vocab_size:
                # Out-of-range ids would silently alias other n-grams' keys.
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
            x, y = arr[:, :-1], arr[:, 1:]
            u = np.concatenate([np.full((len(arr), 1), self.no_token), x[:, :-1]], axis=1)
            keep = np.ones_like(y, bool) if keep_pad else y != PAD_ID
            us.append(u[keep])
            vs.append(x[keep])
            ws.append(y[keep])
        return np.concatenate(us), np.concatenate(vs), np.concatenate(ws)

    def fit(self, windows: Windows) -> "KneserNeyTrigram":
        """Count every non-pad target of `windows` ([n, L+1] int, or a list of
        such arrays, e.g. one per client) and build the three orders."""
        return self.fit_counts(*np.unique(self.trigram_keys(windows), return_counts=True))

    def trigram_keys(self, windows: Windows) -> np.ndarray:
        """One key (u·V + v)·V + w per non-pad target of `windows` (u = V: no token before the window)."""
        V = self.vocab_size
        u, v, w = self._events(windows)
        return (u * V + v) * V + w

    def fit_counts(self, trigrams: np.ndarray, c3: np.ndarray) -> "KneserNeyTrigram":
        """Build the three orders from trigram counts: sorted distinct `trigram_keys` and their counts
        (say, only the trigrams enough users typed)."""
        V = self.vocab_size
        trigrams, c3 = np.asarray(trigrams, np.int64), np.asarray(c3, np.int64)
        ctx3, w3 = trigrams // V, trigrams % V
        # Continuation counts: each distinct trigram type adds 1 to its bigram.
        bigrams, cont2 = np.unique(ctx3 % V * V + w3, return_counts=True)
        v2, w2 = bigrams // V, bigrams % V
        cont1 = np.bincount(w2, minlength=V)  # N1+(., w): distinct words before w

        fixed = self.discount
        d1 = fixed or _ney_discount(cont1)
        d2 = fixed or _ney_discount(cont2)
        d3 = fixed or _ney_discount(c3)
        self.discounts = (d1, d2, d3)

        total = cont1.sum()
        if total:
            self._unigram = (np.maximum(cont1 - d1, 0) / total
                             + d1 * np.count_nonzero(cont1) / total / V)
        else:
            self._unigram = np.full(V, 1.0 / V)
        self._bigram = _Level(v2, w2, cont2, d2)
        self._trigram = _Level(ctx3, w3, c3, d3)
        return self

    def _probabilities(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """p(. | u, v) as dense rows [C, V]; each row depends only on its own (u, v)."""
        rows = np.tile(self._unigram, (len(u), 1))
        if self._trigram is not None:
            self._bigram.apply(rows, v)
            self._trigram.apply(rows, u * self.vocab_size + v)
        return rows

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities [n, L, V] of the next token at every position
        (pad positions included). Dense: meant for small inputs and tests."""
        windows = np.asarray(windows)
        n, length = windows.shape[0], windows.shape[1] - 1
        u, v, _ = self._events(windows, keep_pad=True)
        return self._probabilities(u, v).reshape(n, length, self.vocab_size)

    def evaluate(self, windows: Windows, chunk: int = 512, workers: int = 2) -> Hits:
        """Top-1 / top-3 hits over all non-pad positions, by contract.model.metrics.count_hits.

        Positions are grouped by context so each distinct context's
        distribution is built once: scores go to count_hits as [R, 1, V]
        against targets [R, k] (padded with pad, which count_hits ignores),
        `chunk` rows at a time, so memory is bounded by workers * chunk * V
        floats. NumPy's argpartition releases the GIL, so threads use the cores.
        """
        V, per_row = self.vocab_size, self._TARGETS_PER_ROW
        u, v, w = self._events(windows)
        context = u * V + v
        order = np.argsort(context, kind="stable")
        context, w = context[order], w[order]
        keys, start, count = np.unique(context, return_index=True, return_counts=True)
        pieces = -(-count // per_row)
        group = np.repeat(np.arange(len(keys)), count)
        occurrence = np.arange(len(w)) - start[group]
        row = (np.cumsum(pieces) - pieces)[group] + occurrence // per_row
        targets = np.full((int(pieces.sum()), per_row), PAD_ID, dtype=np.int32)
        targets[row, occurrence % per_row] = w
        row_context = np.repeat(keys, pieces)

        def chunk_hits(lo: int) -> Hits:
            ctx = row_context[lo:lo + chunk]
            probs = self._probabilities(ctx // V, ctx % V)
            return count_hits(probs[:, None, :], targets[lo:lo + chunk])

        with ThreadPoolExecutor(max(workers, 1)) as pool:
            return sum(pool.map(chunk_hits, range(0, len(targets), chunk)), Hits())
