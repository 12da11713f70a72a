"""Secure aggregation's cryptography on its own (contract.secagg.masking, contract.secagg.shamir): no server."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from contract.secagg import shamir
from contract.update.pipeline import Contribution, UpdatePipeline, running_sum
from contract.secagg.masking import (KEY, SELF, DeviceSecAgg, Member, Neighbour, SecAggError, default_degree,
                             masking_set, neighbour_graph, threshold, unmask)
from contract.update.spec import UpdateSpec

SIZE = 3000


def test_shamir_any_t_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="fewer than the threshold"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    tampered = {1: shares[1], 2: shares[2], 3: bytes(shamir.SHARE_BYTES - 1) + b"\x01"}
    try:
        rebuilt = shamir.combine(tampered, 3)
    except ValueError:          # not even a 32-byte value
        rebuilt = None
    assert rebuilt != secret
    with pytest.raises(ValueError):
        shamir.split(secret, 4, [1, 2, 3])


def test_the_neighbour_graph_is_k_regular_and_complete_for_small_rounds():
    for n in (3, 10, 40, 100):
        assert default_degree(n) == n - 1            # small rounds: every device a neighbour of all
        g = neighbour_graph(n, default_degree(n))
        assert all(g[u] == set(g) - {u} for u in g)
    for n, k in ((200, 118), (1000, 134)):           # then O(log n): it grows by ~6 per doubling
        assert default_degree(n) == k
        g = neighbour_graph(n, k)
        assert all(len(g[u]) == k and u not in g[u] for u in g)
        assert all(u in g[v] for u in g for v in g[u])
    assert default_degree(1000, max_dropout=0.1) == 24 and threshold(134) == 68


def spec(n: int):
    return UpdateSpec(bits=8, rotation=True, secure_aggregation=True).bind(SIZE, "0" * 64, "en/1", 5, n)


class Round:
    """n devices through every phase in memory; `drop[phase]` = devices that vanish before it."""

    def __init__(self, n: int, drop: dict[str, set[int]], seed: int = 0, k: int | None = None):
        self.spec = spec(n)
        self.pipeline = UpdatePipeline(self.spec)
        domain = self.spec.fingerprint.encode()
        self.devices = {u: DeviceSecAgg(domain) for u in range(1, n + 1)}
        ads = {u: d.advertise() for u, d in self.devices.items() if u not in drop.get("keys", set())}
        order = sorted(ads)
        k = k or default_degree(len(order))
        graph = neighbour_graph(len(order), k)
        graph = {order[i - 1]: {order[j - 1] for j in vs} for i, vs in graph.items()}
        self.t = threshold(k)
        sent = {u: self.devices[u].share(u, self.t, [Neighbour(v, ads[v].enc_pk, ads[v].mask_pk)
                                                     for v in sorted(graph[u])])
                for u in order if u not in drop.get("shares", set())}
        u2 = masking_set(graph, set(sent), self.t)
        rng = np.random.default_rng(seed)
        self.masked, self.plain, self.survivors = running_sum(self.pipeline), running_sum(self.pipeline), set()
        self.excluded = set(sent) - u2
        for u in sorted(u2):
            self.devices[u].receive({v: sent[v][u] for v in u2 if u in sent[v]})
            if u in drop.get("masking", set()):
                continue
            delta, weight, s = rng.normal(0, 3e-2, SIZE), int(rng.integers(1, 300)), int(rng.integers(1 << 30))
            body = self.pipeline.encode(delta, weight, s, masker=self.devices[u].mask).body
            self.masked.add(self.pipeline.accept(body, None))
            self.plain.add(Contribution(self.pipeline.plaintext(delta, weight, s).astype(np.int64), 0, 0.0))
            self.survivors.add(u)
        self.members = {u: Member(u, ads[u].mask_pk, ads[u].commitment, frozenset(graph[u] & u2)) for u in u2}
        self.shares: dict[int, dict[int, bytes]] = {}
        for u in self.survivors - drop.get("unmasking", set()):
            maskers = self.members[u].maskers
            given = self.devices[u].reveal(sorted(maskers & self.survivors), sorted(maskers - self.survivors))
            for owner, (_, share) in given.items():
                self.shares.setdefault(owner, {})[u] = share

    def unmask(self) -> np.ndarray:
        out = unmask(self.masked.total, self.members, self.survivors, self.shares, self.t,
                     self.spec.fingerprint.encode())
        return self.pipeline.ring.reduce(out.astype(np.int64))


PHASES = ("keys", "shares", "masking", "unmasking")


@pytest.mark.parametrize("phase,fraction", [("none", 0.0)] + [(p, f) for p in PHASES for f in (0.1, 0.3)]
                         + [("spread", 0.3)])
def test_the_unmasked_sum_is_exactly_the_survivors_sum_with_dropouts_at_every_phase(phase, fraction):
    """`fraction` of the devices vanish just before `phase` ("spread": the fraction split over all
    four). Dropping 30% at every phase in turn is not survivable by design: after sharing, only
    0.7 × 0.7 = 49% of a device's neighbours would reveal, fewer than t > k/2."""
    n = 40
    rng = np.random.default_rng(hash((phase, fraction)) % 2**32)
    pick = lambda count: set(rng.choice(np.arange(1, n + 1), count, replace=False).tolist())  # noqa: E731
    if phase == "spread":
        chosen = list(pick(int(fraction * n)))
        drop = {p: set(chosen[i::4]) for i, p in enumerate(PHASES)}
    else:
        drop = {phase: pick(int(fraction * n))} if fraction else {}
    r = Round(n, drop)
    gone = set().union(*drop.values()) - drop.get("unmasking", set())
    assert r.survivors == set(range(1, n + 1)) - gone - r.excluded
    assert len(r.excluded) <= 0.1 * n
    np.testing.assert_array_equal(r.unmask(), r.plain.total)                  # bit for bit
    np.testing.assert_array_equal(r.pipeline.finalize_masked(r.unmask(), len(r.survivors)),
                                  r.pipeline.finalize_masked(r.plain.total, len(r.survivors)))


def test_a_sparse_graph_unmasks_exactly_too():
    """k = 24 of 80 devices (each masks with 24, not 79), 2 leaving before each phase."""
    drop = {"keys": {1, 2}, "shares": {3, 4}, "masking": {5, 6}, "unmasking": {7, 8}}
    r = Round(80, drop, k=24)
    assert all(len(m.maskers) <= 24 for m in r.members.values()) and len(r.survivors) >= 70
    np.testing.assert_array_equal(r.unmask(), r.plain.total)


def test_a_masked_upload_is_uniform_and_unlike_its_plaintext():
    r = Round(8, {})
    one = r.pipeline.encode(np.random.default_rng(1).normal(0, 3e-2, SIZE), 50, 3,
                            masker=r.devices[1].mask).body
    masked = r.pipeline.accept(one, None).units[:r.pipeline.count]
    m = r.spec.modulus_bits
    counts = np.bincount((masked >> (m - 6)).astype(np.int64), minlength=64)    # 64 bins of the top bits
    assert stats.chisquare(counts).pvalue > 1e-3
    plain = r.pipeline.plaintext(np.random.default_rng(1).normal(0, 3e-2, SIZE), 50, 3)[:r.pipeline.count]
    assert stats.chisquare(np.bincount(plain.astype(np.int64) >> (m - 6), minlength=64)).pvalue < 1e-12


def test_a_missing_wrong_or_tampered_share_fails_loudly():
    r = Round(12, {"masking": {3}})
    owner = next(iter(r.survivors))
    missing = {o: dict(list(s.items())[:r.t - 1]) if o == owner else s for o, s in r.shares.items()}
    with pytest.raises(SecAggError, match="fewer than t"):
        unmask(r.masked.total, r.members, r.survivors, missing, r.t, r.spec.fingerprint.encode())
    for victim in (owner, 3):                                   # a survivor's seed, a dropped device's key
        bad = {o: dict(s) for o, s in r.shares.items()}
        revealer = next(iter(bad[victim]))
        bad[victim][revealer] = bytes(len(bad[victim][revealer]) - 1) + b"\x07"
        with pytest.raises(SecAggError, match="does not match|not a field|32-byte"):
            unmask(r.masked.total, r.members, r.survivors, bad, r.t, r.spec.fingerprint.encode())


def test_a_device_never_reveals_both_shares_of_one_neighbour():
    r = Round(6, {})
    device, neighbour = r.devices[1], 2
    with pytest.raises(SecAggError, match="both"):
        device.reveal([neighbour], [neighbour])
    device.reveal([neighbour], [])
    with pytest.raises(SecAggError, match="already revealed the other"):
        device.reveal([], [neighbour])
    assert device.reveal([neighbour], [])[neighbour][0] == SELF     # asking again for the same kind is fine
    with pytest.raises(SecAggError, match="holds no shares"):
        device.reveal([99], [])
    assert KEY != SELF


def test_a_share_tampered_with_on_the_way_does_not_decrypt():
    domain = spec(3).fingerprint.encode()
    a, b = DeviceSecAgg(domain), DeviceSecAgg(domain)
    ad_a, ad_b = a.advertise(), b.advertise()
    to_b = a.share(1, 1, [Neighbour(2, ad_b.enc_pk, ad_b.mask_pk)])[2]
    b.share(2, 1, [Neighbour(1, ad_a.enc_pk, ad_a.mask_pk)])
    with pytest.raises(SecAggError, match="tampered"):
        b.receive({1: to_b[:-1] + bytes([to_b[-1] ^ 1])})
    other_round = DeviceSecAgg(spec(4).fingerprint.encode())
    other_round.share(2, 1, [Neighbour(1, ad_a.enc_pk, ad_a.mask_pk)])
    with pytest.raises(SecAggError, match="tampered"):
        other_round.receive({1: to_b})                             # replayed into another round
    assert b.receive({1: to_b}) == [1]
