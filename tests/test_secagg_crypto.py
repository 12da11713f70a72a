"""Secure aggregation's cryptography on its own (contract.secagg.masking, contract.secagg.shamir): no server."""
from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest
from scipy import stats

from contract.secagg import shamir
from contract.update.pipeline import Contribution, UpdatePipeline, running_sum
from contract.secagg.masking import (KEY, SELF, DeviceSecAgg, Member, Neighbour, SecAggError, default_degree,
                                    masking_set, neighbour_graph, threshold, unmask, unmask_report)
from contract.update.spec import UpdateSpec

SIZE = 3000


def test_shamir_any_t_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir.decode({x: shares[x] for x in subset}, 3) == shamir.Decoded(secret, frozenset())
    with pytest.raises(ValueError, match="fewer than the threshold"):
        shamir.decode({1: shares[1], 2: shares[2]}, 3)
    tampered = {1: shares[1], 2: shares[2], 3: bytes(shamir.SHARE_BYTES - 1) + b"\x01"}
    try:
        rebuilt = shamir.decode(tampered, 3).secret   # exactly t shares: nothing to check them against
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


def test_too_few_shares_or_too_many_wrong_fail_naming_the_owner():
    r = Round(12, {"masking": {3}})                 # k = 11, t = 6: 10 revealers per survivor's seed
    domain = r.spec.fingerprint.encode()
    owner = min(r.survivors)
    missing = {o: dict(list(s.items())[:r.t - 1]) if o == owner else s for o, s in r.shares.items()}
    with pytest.raises(SecAggError, match=f"device {owner}:.*fewer than the threshold") as e:
        unmask(r.masked.total, r.members, r.survivors, missing, r.t, domain)
    assert e.value.owners == (owner,)
    for victim in (owner, 3):                       # a survivor's seed, a dropped device's key
        n = len(r.shares[victim])
        bad = {o: dict(s) for o, s in r.shares.items()}
        liars = sorted(bad[victim])[:(n - r.t) // 2 + 1]          # one more than can be corrected
        for revealer in liars:
            bad[victim][revealer] = secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
        with pytest.raises(SecAggError, match=f"device {victim}:") as e:
            unmask(r.masked.total, r.members, r.survivors, bad, r.t, domain)
        assert e.value.owners == (victim,)
    forged = {o: dict(s) for o, s in r.shares.items()}        # all consistent, of another seed: only
    forged[owner] = shamir.split(bytes(32), r.t, forged[owner])  # the commitment tells
    with pytest.raises(SecAggError, match=f"device {owner}: .*does not match its commitment"):
        unmask(r.masked.total, r.members, r.survivors, forged, r.t, domain)


def liar_round(seed: int, n: int, k: int, drop: dict[str, set[int]]) -> tuple[Round, dict, dict]:
    """A round whose reveals carry kinds, with up to the correctable number of wrong shares per secret:
    random values, the other kind, or a neighbour's share passed off as another's."""
    r = Round(n, drop, seed=seed, k=k)
    rng = np.random.default_rng(seed)
    shares = {o: {v: (SELF if o in r.survivors else KEY, share) for v, share in s.items()}
              for o, s in r.shares.items()}
    expected: dict[int, set[int]] = {}
    for o in sorted(shares):
        given = shares[o]
        e = int(rng.integers(0, (len(given) - r.t) // 2 + 1))
        for v in rng.choice(sorted(given), e, replace=False).tolist():
            kind, share = given[v]
            how = int(rng.integers(3))
            if how == 0:
                given[v] = (kind, secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big"))
            elif how == 1:
                given[v] = (KEY if kind == SELF else SELF, share)
            else:   # from the round's own shares: a swap already made the other way would give back the truth
                given[v] = (kind, r.shares.get(v, {}).get(o, bytes(shamir.SHARE_BYTES)))
            expected.setdefault(v, set()).add(o)
    return r, shares, expected


@pytest.mark.parametrize("seed,n,k", [(1, 8, 7), (2, 12, 11), (3, 30, 10), (4, 31, 30)])
def test_wrong_shares_are_corrected_and_their_revealers_named(seed, n, k):
    """Up to (n - t) / 2 wrong shares per secret, from random revealers: the exact sum, and every
    wrong revealer named with the owners it lied about."""
    r, shares, expected = liar_round(seed, n, k, {"masking": {2, 5}})
    assert expected                                    # the draw did put liars in
    out = unmask_report(r.masked.total, r.members, r.survivors, shares, r.t, r.spec.fingerprint.encode())
    np.testing.assert_array_equal(r.pipeline.ring.reduce(out.total.astype(np.int64)), r.plain.total)
    assert out.wrong == {v: frozenset(owners) for v, owners in expected.items()}


def test_a_reveal_for_the_wrong_neighbour_is_excluded_not_fatal():
    r = Round(20, {"masking": {4}}, seed=7, k=8)      # sparse: most devices hold no share of one another
    shares = {o: dict(s) for o, s in r.shares.items()}
    owner = min(r.survivors)
    stranger = next(u for u in sorted(r.survivors) if u not in r.members[owner].maskers and u != owner)
    shares[owner][stranger] = bytes(shamir.SHARE_BYTES)              # a share it never held
    shares.setdefault(99, {})[stranger] = bytes(shamir.SHARE_BYTES)   # of a device outside the round
    out = unmask_report(r.masked.total, r.members, r.survivors, shares, r.t, r.spec.fingerprint.encode())
    np.testing.assert_array_equal(r.pipeline.ring.reduce(out.total.astype(np.int64)), r.plain.total)
    assert out.wrong == {stranger: frozenset({owner, 99})}


@pytest.mark.parametrize("n,t", [(3, 2), (5, 3), (7, 4), (10, 6), (16, 9), (30, 16)])
def test_reed_solomon_corrects_every_e_up_to_the_bound_and_no_more(n, t):
    rng = np.random.default_rng(n)
    secret = secrets.token_bytes(32)
    xs = sorted(rng.choice(np.arange(1, 10**6), n, replace=False).tolist())
    shares = shamir.split(secret, t, xs)
    bound = (n - t) // 2
    for e in range(bound + 2):
        for _ in range(3):
            bad = dict(shares)
            liars = set(rng.choice(xs, e, replace=False).tolist())
            for x in liars:
                bad[x] = secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
            if e <= bound:
                assert shamir.decode(bad, t) == shamir.Decoded(secret, frozenset(liars))
            elif n > t:             # one more than the bound: refused (n == t cannot even tell)
                with pytest.raises(ValueError, match="corrected|further"):
                    shamir.decode(bad, t)
    malformed = dict(shares) | {xs[0]: b"\xff" * shamir.SHARE_BYTES, xs[1]: b"\x01"}   # erasures: set aside
    if n - 2 >= t:
        assert shamir.decode(malformed, t) == shamir.Decoded(secret, frozenset(xs[:2]))


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
