"""DP-FTRL's correlated noise: binary-tree aggregation with restarts, regenerated from a key. TensorFlow-free.

DP-FTRL (Kairouz et al. 2021) needs no sampling: the server adds to each
round's sum of clipped updates noise that is *correlated across rounds*, so
that the running sum of the releases (which is what FTRL, and server SGD on
the releases, puts into the model) carries the noise of O(log t) Gaussians
instead of t. What the released models are private with respect to is then
only how often one device can take part (privacy.ftrl accounts that).

Why a tree, and not a banded or BLT matrix factorization
---------------------------------------------------------
The server must be able to rebuild round t's noise after a SIGKILL, or on a
replica that takes over, from a secret key and t alone: no model-size vector
may be stored per round. Any mechanism of the form x̂ = x + B·g (strategy C,
decoder B = C⁻¹ for the per-round releases) adds to round t the noise
Σ_s B[t, s]·g_s. For a banded Toeplitz strategy C (Choquette-Choo et al. 2023)
C⁻¹ is a dense lower triangle, so round t needs every g_s, s ≤ t: t vectors
regenerated per round (or a buffer of b past vectors kept); BLT (Dvijotham et
al. 2024) needs a few buffer vectors carried from round to round, i.e. stored.
For the binary tree with restarts, B is the difference of two dyadic prefix
decompositions: round t needs the node that completes at t and the nodes that
leave the prefix (1 + the trailing ones of the leaf index), O(log t) vectors,
each regenerated from an HKDF-derived key. The tree is also what TFF's
`DifferentiallyPrivateFactory.tree_aggregation` computes (tests/test_ftrl.py
holds the two to the same covariance), and its sensitivity under (k, b)
participation is exact and fast to compute (privacy.ftrl).

The layout
----------
DP rounds are numbered 0, 1, 2, … (the population's *released* FTRL rounds).
The accounting horizon is n rounds; the tree restarts at the start of every
horizon and every `restart_every` rounds within one, so no node spans two
horizons (they compose as separate mechanisms). A tree of L leaves holds the
complete dyadic nodes (level ℓ, index i), covering leaves [i·2^ℓ, (i+1)·2^ℓ)
⊂ [0, L); each node is N(0, I) in its own keyed stream. The prefix noise
after m leaves is the sum of the nodes of m's binary decomposition, and leaf
j's noise is prefix(j + 1) − prefix(j).

Adaptive clipping
-----------------
The tree runs on the round sums divided by their clip C_t, whose per-device
sensitivity is 1 whatever C_t is; its node noise is N(0, z²) and the release
is scaled back by C_t (post-processing, as C_t depends on earlier releases
only): round t's sum gets `clip_t · z · unit(t)`. Changing C_t every round
keeps the privacy, but the model's noise then telescopes only where C_t is
constant (Σ C_t·(P_t − P_{t−1}) = C_T·P_T − Σ (C_{t+1} − C_t)·P_t); TFF's
`tree_adaptive` therefore applies a new clip only at restarts, and
`starts_tree` tells the server when that is.

What the server must hold to
----------------------------
The noise of round t is a function of (key, t): releasing two different sums
for the same t (a retried round published twice, two replicas finishing the
same round) would release their difference without noise. Exactly one
release per DP round index, the index advanced in the same transaction that
publishes the release; an abandoned round that released nothing may reuse
its index. The participation rule (k per horizon, b apart) must count in
these indices, not in server round numbers, or abandoned rounds would
shrink the real separation. The key comes from `new_key()` (os.urandom) and
is as secret as the noise itself: whoever holds it can subtract the noise;
it never goes into a round's spec, a log or a metric.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contract.dp.noise import SecureRandom

KEY_BYTES = 32
NODE_INFO = b"nightjar dp-ftrl tree node v1"

Node = tuple[int, int]          # (level ℓ, index i): leaves [i·2^ℓ, (i+1)·2^ℓ) of its tree


def new_key() -> bytes:
    """A fresh secret key for a population's tree noise, from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Where a DP round sits: which horizon, which tree in it, which leaf, and the tree's size."""

    horizon: int
    tree: int
    leaf: int
    length: int                 # leaves of this tree: restart_every, or what the horizon leaves the last


def locate(round_index: int, horizon: int, restart_every: int) -> Leaf:
    """The leaf of DP round `round_index` (trees restart every `restart_every` rounds and every horizon)."""
    if round_index < 0 or horizon < 1 or restart_every < 1:
        raise ValueError("round_index must be >= 0, horizon and restart_every >= 1")
    h, j = divmod(int(round_index), int(horizon))
    tree, leaf = divmod(j, int(restart_every))
    return Leaf(h, tree, leaf, min(int(restart_every), int(horizon) - tree * int(restart_every)))


def starts_tree(round_index: int, horizon: int, restart_every: int) -> bool:
    """Whether this DP round is a tree's first leaf (where a new adaptive clip costs the tree nothing)."""
    return locate(round_index, horizon, restart_every).leaf == 0


def tree_nodes(length: int) -> list[Node]:
    """Every complete dyadic node of a tree of `length` leaves (the strategy matrix's rows)."""
    out, level = [], 0
    while (1 << level) <= length:
        out += [(level, i) for i in range(length >> level)]
        level += 1
    return out


def node_leaves(node: Node) -> range:
    level, index = node
    return range(index << level, (index + 1) << level)


def prefix_nodes(m: int) -> list[Node]:
    """The nodes whose sum is the prefix [0, m): one per set bit of m (highest first)."""
    return [(level, (m >> level) - 1) for level in reversed(range(m.bit_length())) if (m >> level) & 1]


def residual_nodes(leaf: int) -> tuple[Node, list[Node]]:
    """(the node added, the nodes removed) going from prefix(leaf) to prefix(leaf + 1)."""
    p = (leaf ^ (leaf + 1)).bit_length() - 1       # trailing ones of leaf: they carry into bit p
    return (p, ((leaf + 1) >> p) - 1), [(level, (leaf >> level) - 1) for level in range(p)]


def standard_normals(key: bytes, n: int) -> np.ndarray:
    """n N(0, 1) deviates from the ChaCha20 stream of `key`, prefix-stable (the first n of n + m).

    Box–Muller on consecutive pairs of uniforms, so a node's vector drawn for a
    larger model starts with the vector drawn for a smaller one.
    """
    half = (int(n) + 1) // 2
    u = SecureRandom(key).uniform(2 * half).reshape(half, 2)
    r, angle = np.sqrt(-2.0 * np.log(u[:, 0])), 2 * np.pi * u[:, 1]
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1).reshape(-1)[:int(n)]


class RoundSource:
    """Round t's tree noise where contract.update's `CentralNoise` expects a `SecureRandom`:
    `normal(n, stddev)` is stddev · unit(t) (pass stddev = z · C_t). For the values' noise only."""

    def __init__(self, tree: "TreeNoise", round_index: int):
        self._tree, self._round = tree, round_index

    def normal(self, n: int, stddev: float = 1.0) -> np.ndarray:
        return self._tree.noise(self._round, n, stddev)


class TreeNoise:
    """A population's DP-FTRL noise: stateless, a function of (key, DP round index, vector size).

    `label` separates populations sharing one key (HKDF's info). A new object
    built from the same key after a restart adds exactly the noise the old one
    would have added.
    """

    def __init__(self, key: bytes, horizon: int, restart_every: int, label: str = ""):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a DP-FTRL key is {KEY_BYTES} bytes")
        locate(0, horizon, restart_every)               # validates the layout
        self._key = bytes(key)
        self.horizon, self.restart_every, self.label = int(horizon), int(restart_every), label

    def __repr__(self) -> str:                          # never the key
        return f"TreeNoise(horizon={self.horizon}, restart_every={self.restart_every}, label={self.label!r})"

    def node_key(self, at: Leaf, node: Node) -> bytes:
        """The ChaCha20 key of one node of one tree (HKDF-SHA256 of the population key)."""
        label = self.label.encode()
        info = NODE_INFO + struct.pack(">I", len(label)) + label + struct.pack(
            ">QQQQ", at.horizon, at.tree, node[0], node[1])
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(self._key)

    def node_noise(self, at: Leaf, node: Node, size: int) -> np.ndarray:
        """The node's N(0, I) vector in a tree of `at`'s horizon and index."""
        return standard_normals(self.node_key(at, node), size)

    def unit(self, round_index: int, size: int) -> np.ndarray:
        """Round t's noise with unit node noise: prefix(leaf + 1) − prefix(leaf) of its tree."""
        at = locate(round_index, self.horizon, self.restart_every)
        added, removed = residual_nodes(at.leaf)
        out = self.node_noise(at, added, size)
        for node in removed:
            out -= self.node_noise(at, node, size)
        return out

    def noise(self, round_index: int, size: int, stddev: float) -> np.ndarray:
        """What the server adds to round t's sum: stddev · unit(t), stddev = z · C_t (zeros for 0)."""
        if stddev <= 0:
            return np.zeros(int(size))
        return float(stddev) * self.unit(round_index, size)

    def add(self, total: np.ndarray, round_index: int, stddev: float) -> np.ndarray:
        """The round's released sum: `total` + its tree noise."""
        total = np.asarray(total, np.float64)
        return total + self.noise(round_index, total.size, stddev)

    def source(self, round_index: int) -> RoundSource:
        return RoundSource(self, round_index)
