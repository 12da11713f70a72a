"""The L2 sensitivity of a correlated-noise strategy matrix under (k, b)-participation. TensorFlow-free.

A strategy C (rows: noised linear queries, e.g. tree nodes; columns: rounds)
releases C·x + noise. One device takes part in at most k rounds of the
horizon, any two of them at least b apart, contributing a vector of norm
<= 1 to each (its clipped update over the round's clip). Its worst-case
effect on the release is

    Δ² = max over patterns π of  max_{|x_t| <= 1}  Σ_{s,t ∈ π} G[s, t]·<x_s, x_t>,   G = CᵀC,

which is Σ_{s,t ∈ π} G[s, t] (all x_t equal) when the entries of G that a
pattern can meet (|s − t| >= b) are >= 0. Finding the worst pattern is a
quadratic search in general; two structures make it exact and fast, and
`sensitivity` finds which one the matrix has:

* *laminar*: every row is constant on one run of consecutive rounds, and any
  two runs are nested or disjoint (binary trees, with or without restarts).
  Then Σ_{s,t ∈ π} G[s, t] = Σ_rows w_r·|π ∩ run_r|², and a dynamic program on
  the forest of runs is exact: for each subtree and count c it keeps the best
  value given how far the first and last participations sit from its edges
  (slack clipped to b − 1, beyond which a neighbour cannot interfere), and
  joins siblings with a max-plus product over that slack. Identical subtrees
  (the restarted trees, the halves of a dyadic node) are solved once.
* *b-banded Gram*: G[s, t] = 0 whenever |s − t| >= b (banded strategies with
  at most b bands, trees restarted every <= b rounds): columns of different
  participations never meet, Δ² is the best Σ G[t, t] over a pattern, a 1-D
  dynamic program (Choquette-Choo et al. 2023, "(Amplified) banded matrix
  factorization", VecSens).

`brute_force_sensitivity` enumerates every pattern, for the tests.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import sparse

Strategy = np.ndarray | sparse.spmatrix        # rows × rounds, dense or scipy.sparse
CHUNK = 1 << 21                 # max-plus temporaries in float64 entries (16 MB)


def check_participation(k: int, b: int) -> None:
    if not (isinstance(k, int) and k >= 1 and isinstance(b, int) and b >= 1):
        raise ValueError("participation needs integers k >= 1 (times per horizon) and b >= 1 (separation)")


def max_participations(rounds: int, k: int, b: int) -> int:
    """How many times a (k, b)-device can really take part in `rounds` rounds."""
    return min(k, (rounds - 1) // b + 1) if rounds > 0 else 0


def _csr(strategy) -> sparse.csr_matrix:
    m = sparse.csr_matrix(strategy, dtype=np.float64)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    return m


def sensitivity(strategy: Strategy, k: int, b: int) -> float:
    """Δ of `strategy` (rows × rounds, dense or scipy.sparse) under (k, b)-participation, exactly.

    ValueError when the matrix is neither laminar nor b-banded (no exact
    method here; `brute_force_sensitivity` for small horizons).
    """
    check_participation(k, b)
    m = _csr(strategy)
    runs = _runs(m)
    if runs is not None:
        forest = _forest(*runs, m.shape[1])
        if forest is not None:
            return math.sqrt(max(0.0, _Laminar(forest[0], k, b).best(forest[1])))
    gram = (m.T @ m).tocoo()
    if np.any(np.abs(gram.row - gram.col) >= b):
        raise ValueError("the strategy is neither laminar (tree-like) nor b-banded: no exact sensitivity")
    return math.sqrt(max(0.0, _banded(np.asarray(gram.tocsr().diagonal()), k, b)))


def _banded(diagonal: np.ndarray, k: int, b: int) -> float:
    """max Σ_{t ∈ π} diagonal[t] over (k, b)-patterns π; f[i]: best using rounds >= i."""
    n = diagonal.size
    f = np.zeros(n + b)
    for _ in range(max_participations(n, k, b)):
        g = np.zeros(n + b)
        g[:n] = diagonal + f[b:b + n]                   # take round i, then the best from i + b on
        f = np.maximum.accumulate(g[::-1])[::-1]
    return float(f[0])


def brute_force_sensitivity(strategy: Strategy, k: int, b: int) -> float:
    """Δ by enumerating every (k, b)-pattern of a horizon of at most 20 rounds (a test oracle)."""
    check_participation(k, b)
    gram = np.asarray((_csr(strategy).T @ _csr(strategy)).todense())
    n = gram.shape[0]
    if n > 20:
        raise ValueError("brute force is for horizons of at most 20 rounds")
    far = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) >= b
    if np.any(gram[far] < 0):
        raise ValueError("Gram entries between rounds b apart are negative: Σ G is not the maximum")
    best = 0.0
    stack = [(-b, 0, 0.0, ())]                          # (last round, participations, value, rounds)
    while stack:
        last, count, value, chosen = stack.pop()
        best = max(best, value)
        if count == k:
            continue
        for t in range(max(0, last + b), n):
            gain = gram[t, t] + 2 * sum(gram[s, t] for s in chosen)
            stack.append((t, count + 1, value + gain, chosen + (t,)))
    return math.sqrt(best)


# -- the laminar dynamic program -------------------------------------------------------------------------


def _runs(m: sparse.csr_matrix):
    """(start, stop, weight) of each nonzero row, or None if some row is not constant on one run."""
    counts = np.diff(m.indptr)
    rows = np.flatnonzero(counts)
    first, last = m.indptr[rows], m.indptr[rows + 1] - 1
    start, stop = m.indices[first], m.indices[last] + 1
    if np.any(stop - start != counts[rows]):
        return None
    if np.any(m.data != np.repeat(m.data[first], counts[rows])):
        return None
    return start, stop, m.data[first] ** 2


def _forest(start, stop, weight, n: int):
    """Shapes of the laminar forest of runs (identical subtrees share one id), or None if two runs cross.

    A shape is (size, weight, parts): parts are child shape ids (>= 0) and gaps
    of rounds in no child (−length), in order. Returns (shapes, the horizon's id).
    """
    merged: dict[tuple[int, int], float] = {}
    for s, e, w in zip(start.tolist(), stop.tolist(), weight.tolist()):
        merged[(s, e)] = merged.get((s, e), 0.0) + w
    runs = sorted(merged, key=lambda r: (r[0], -r[1]))
    children: list[list[int]] = [[] for _ in runs]
    top, stack = [], []
    for i, (s, e) in enumerate(runs):
        while stack and runs[stack[-1]][1] <= s:
            stack.pop()
        if stack and runs[stack[-1]][1] < e:
            return None                                 # crossing runs: not laminar
        (children[stack[-1]] if stack else top).append(i)
        stack.append(i)
    shapes: list[tuple] = []
    ids: dict[tuple, int] = {}
    sid = [0] * len(runs)

    def intern(lo: int, hi: int, w: float, kids: list[int]) -> int:
        parts, cursor = [], lo
        for c in kids:
            if runs[c][0] > cursor:
                parts.append(-(runs[c][0] - cursor))
            parts.append(sid[c])
            cursor = runs[c][1]
        if hi > cursor:
            parts.append(-(hi - cursor))
        shape = (hi - lo, w, tuple(parts))
        if shape not in ids:
            ids[shape] = len(shapes)
            shapes.append(shape)
        return ids[shape]

    for i in reversed(range(len(runs))):                # children come after their parent in `runs`
        sid[i] = intern(runs[i][0], runs[i][1], merged[runs[i]], children[i])
    return shapes, intern(0, n, 0.0, top)


class _Laminar:
    """Tables T[c, e, y]: the best Σ w·count² inside a subtree with c participations, the first at
    least e rounds from its left edge and the last at least y from its right edge (e, y < b).

    A table asked only at e = 0 (or y = 0) has that axis of length 1: the
    horizon's leftmost (rightmost) subtrees are never constrained from outside.
    """

    def __init__(self, shapes: list[tuple], k: int, b: int):
        self.shapes, self.k, self.b = shapes, k, b
        self.memo: dict[tuple[int, int, int], np.ndarray] = {}

    def best(self, root: int) -> float:
        return float(self.table(root, 1, 1)[:, 0, 0].max())

    def size(self, part: int) -> int:
        return -part if part < 0 else self.shapes[part][0]

    def cap(self, size: int) -> int:
        return max_participations(size, self.k, self.b)

    def table(self, part: int, e: int, y: int) -> np.ndarray:
        key = (part, e, y)
        if key not in self.memo:
            self.memo[key] = self.free(-part, e, y) if part < 0 else self.node(part, e, y)
        return self.memo[key]

    def free(self, size: int, e: int, y: int) -> np.ndarray:
        """Rounds in no row: any placement that fits is worth 0."""
        c = np.arange(self.cap(size) + 1)[:, None, None]
        fits = np.arange(e)[None, :, None] + np.arange(y)[None, None, :] + (c - 1) * self.b <= size - 1
        return np.where(fits | (c == 0), 0.0, -np.inf)

    def node(self, sid: int, e: int, y: int) -> np.ndarray:
        size, weight, parts = self.shapes[sid]
        full, last = self.b, len(parts) - 1
        acc = self.table(parts[0], e, y if last == 0 else full)
        span = self.size(parts[0])
        for i, part in enumerate(parts[1:], 1):
            acc = self.join(acc, span, self.table(part, full, y if i == last else full), self.size(part))
            span += self.size(part)
        out = acc.copy()
        out[1:] += weight * np.arange(1, out.shape[0])[:, None, None] ** 2
        return out

    def join(self, left: np.ndarray, left_size: int, right: np.ndarray, right_size: int) -> np.ndarray:
        """Two adjacent siblings as one: left[c1, e, ·] (full y) then right[c2, ·, y] (full e)."""
        cap = self.cap(left_size + right_size)
        e, y = left.shape[1], right.shape[2]
        out = np.full((cap + 1, e, y), -np.inf)
        out[0] = 0.0
        ys = np.maximum(np.arange(y) - right_size, 0)    # nothing on the right: the left's last moves away
        es = np.maximum(np.arange(e) - left_size, 0)     # nothing on the left: the right's first moves away
        for c in range(1, cap + 1):
            if c < left.shape[0]:
                out[c] = np.maximum(out[c], left[c][:, ys])
            if c < right.shape[0]:
                out[c] = np.maximum(out[c], right[c][es, :])
        for c1 in range(1, left.shape[0]):
            for c2 in range(1, min(right.shape[0], cap - c1 + 1)):
                out[c1 + c2] = np.maximum(out[c1 + c2], _max_plus(left[c1][:, ::-1], right[c2]))
        return out


def _max_plus(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(max, +) product: out[e, y] = max_j left[e, j] + right[j, y].

    `left` is the left sibling's table reversed along its last-slack axis, so
    j pairs a left slack of (b − 1 − j) with a right slack of j: together
    >= b − 1, i.e. the two participations are at least b rounds apart.
    """
    if not (np.isfinite(left).any() and np.isfinite(right).any()):
        return np.full((left.shape[0], right.shape[1]), -np.inf)
    rows = max(1, CHUNK // (left.shape[1] * right.shape[1]))
    return np.concatenate([(left[i:i + rows, :, None] + right[None, :, :]).max(axis=1)
                           for i in range(0, left.shape[0], rows)])
