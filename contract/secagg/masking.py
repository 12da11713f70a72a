"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of a round's updates.

The device's half (`DeviceSecAgg`) and the server's (`unmask`) of the
cryptography; server/secagg.py runs the phases over HTTP and
device_runtime/secagg.py takes part in them. Per round and device:

1. **advertise** — two fresh X25519 key pairs (one to encrypt shares, one to
   mask) and a 32-byte self-mask seed b from the OS CSPRNG; the device sends
   both public keys and a commitment to b (SHA-256, domain-separated).
2. **neighbours** — the server joins the devices that advertised in a random
   k-regular graph (`neighbour_graph`: Harary's graph on a random order, as
   in Bell et al.; the complete graph for small rounds) and numbers them.
3. **share** — the device splits b and its masking private key t-of-k
   (contract.secagg.shamir, t = ⌊k/2⌋ + 1) and sends each neighbour its two shares,
   encrypted with AES-256-GCM under HKDF-SHA256 of the pairwise X25519 secret
   of the encryption keys; the server only relays them.
4. **mask** — the device adds to its plaintext integers (contract.update.masked.
   RingEncoding) the self mask PRG(b) and, for every neighbour v that shared,
   +PRG(s_uv) if its own number is smaller and −PRG(s_uv) if larger, where
   s_uv = HKDF(X25519(mask key, v's mask key)): pairs cancel in the sum.
5. **unmask** — each surviving device reveals, per neighbour, the share of
   its self-mask seed if it survived or of its masking key if it dropped;
   never both for one neighbour (`reveal` refuses). The server rebuilds each
   secret from the shares revealed, correcting wrong ones (Reed–Solomon
   decoding: n shares with e wrong suffice when n >= t + 2e), checks it
   against its commitment or public key, removes the masks, and names the
   revealers whose shares were wrong (`unmask_report`).

The byte-level constructions (HKDF, the share ciphertext, the mask PRG) are
contract.secagg.primitives'. Every mask is an AES-256-CTR keystream keyed by
a full 256-bit secret, never a short seed; every key is bound to the round by the round spec's
fingerprint, so nothing carries over from one round to another.
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, NoEncryption

from contract.secagg import shamir
from contract.secagg.primitives import (CIPHERTEXT_BYTES, KEY_BYTES, NONCE_BYTES, SHARE_PLAINTEXT,  # noqa: F401
                                        WORD_MODULUS, add_mask, commitment, decrypt_share, encrypt_share,
                                        pair_mask_key, public_bytes, self_mask_key, share_key)

SELF, KEY = "self", "key"


class SecAggError(Exception):
    """A protocol rule would be broken (a device refuses), or a message does not check out.

    From `unmask`: `owners`, the devices whose secrets could not be rebuilt,
    and `wrong`, the revealers found to have sent wrong shares (as in `Unmasked`)."""

    def __init__(self, message: str, owners: tuple[int, ...] = (), wrong: dict[int, frozenset[int]] | None = None):
        super().__init__(message)
        self.owners = owners
        self.wrong = wrong or {}


# -- parameters and the graph (the server decides, the device receives) --------------------


def default_degree(n: int, max_dropout: float = 0.3, failure: float = 1e-3) -> int:
    """k for n devices: the smallest even k (the complete graph if none below n - 1 will do) with
    which a round loses no device's secrets to dropouts, but with probability < `failure`, when up
    to `max_dropout` of the devices leave after the graph is made. A device's secret needs t of its
    k neighbours to come back: n · P[Binomial(k, 1 - max_dropout) < t] < failure. Bell et al. show
    k = O(log n) suffices; the constant grows fast with the dropout a round must survive."""
    for k in range(2, n - 1, 2):
        t = threshold(k)
        tail = sum(math.comb(k, j) * (1 - max_dropout) ** j * max_dropout ** (k - j) for j in range(t))
        if n * tail < failure:
            return k
    return max(n - 1, 0)


def threshold(k: int) -> int:
    """t > k/2: two disjoint sets of t neighbours cannot both exist, so the server cannot collect
    one device's self-seed shares from some and its key shares from others."""
    return k // 2 + 1


def neighbour_graph(n: int, k: int) -> dict[int, set[int]]:
    """A random k-regular graph on the devices 1..n (k even, or the complete graph when k >= n - 1)."""
    order = list(range(1, n + 1))
    secrets.SystemRandom().shuffle(order)
    graph: dict[int, set[int]] = {u: set() for u in order}
    if k >= n - 1:
        return {u: set(order) - {u} for u in order}
    for i, u in enumerate(order):
        for d in range(1, k // 2 + 1):
            v = order[(i + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return graph


def masking_set(graph: dict[int, set[int]], shared: set[int], t: int) -> set[int]:
    """The devices that shared, less any (repeatedly) left with fewer than t neighbours among them:
    their secrets could never be rebuilt."""
    cohort = set(shared)
    while True:
        weak = {u for u in cohort if len(graph[u] & cohort) < t}
        if not weak:
            return cohort
        cohort -= weak


# -- the device's half ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Advertisement:
    enc_pk: bytes           # X25519, raw: neighbours encrypt their shares to this device with it
    mask_pk: bytes          # X25519, raw: the pairwise masks
    commitment: bytes       # SHA-256 of the self-mask seed (bound to the round)


@dataclasses.dataclass(frozen=True)
class Neighbour:
    node: int
    enc_pk: bytes
    mask_pk: bytes


class DeviceSecAgg:
    """One device's secrets for one round, and the rules it keeps. Nothing here leaves the phone
    except what the methods return."""

    def __init__(self, domain: bytes, *, enc_key: bytes | None = None, mask_key: bytes | None = None,
                 seed: bytes | None = None):
        """`enc_key`, `mask_key` (raw X25519 private keys) and `seed` (the 32-byte self-mask seed) are
        drawn from the OS CSPRNG unless given: only known-answer vectors (contract.vectors) give them."""
        self.domain = domain
        self._enc = X25519PrivateKey.from_private_bytes(enc_key) if enc_key else X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.from_private_bytes(mask_key) if mask_key else X25519PrivateKey.generate()
        self._seed = os.urandom(KEY_BYTES) if seed is None else bytes(seed)
        self.node: int | None = None
        self.neighbours: dict[int, Neighbour] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}     # owner → (self-seed share, key share)
        self.revealed: dict[int, str] = {}                   # owner → SELF | KEY, once and for all

    def advertise(self) -> Advertisement:
        return Advertisement(public_bytes(self._enc), public_bytes(self._mask), commitment(self.domain, self._seed))

    def share(self, node: int, t: int, neighbours: list[Neighbour], *, nonces: Mapping[int, bytes] | None = None,
              coefficients: tuple[Sequence[int], Sequence[int]] | None = None) -> dict[int, bytes]:
        """This device's shares for each neighbour, encrypted to it: {neighbour: ciphertext}.
        `nonces` (per neighbour) and `coefficients` (the self seed's and the masking key's
        polynomials above the constant term) come from the OS CSPRNG unless given (vectors only)."""
        if not neighbours or t > len(neighbours) or any(n.node == node for n in neighbours):
            raise SecAggError(f"{len(neighbours)} neighbours cannot hold a {t}-of-k sharing")
        self.node, self.neighbours = node, {n.node: n for n in neighbours}
        mask_key = self._mask.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        seed_coefficients, key_coefficients = coefficients or (None, None)
        seed_shares = shamir.split(self._seed, t, self.neighbours, seed_coefficients)
        key_shares = shamir.split(mask_key, t, self.neighbours, key_coefficients)
        out = {}
        for v, n in self.neighbours.items():
            nonce = os.urandom(NONCE_BYTES) if nonces is None else nonces[v]
            out[v] = encrypt_share(share_key(self.domain, self._enc, n.enc_pk, node, v), self.domain, node, v,
                                   seed_shares[v], key_shares[v], nonce)
        return out

    def receive(self, inbox: dict[int, bytes]) -> list[int]:
        """Decrypt the shares the neighbours sent; the masking set (who shared with this device)."""
        for owner, blob in inbox.items():
            n = self.neighbours.get(owner)
            if n is None or len(blob) != CIPHERTEXT_BYTES:
                raise SecAggError(f"a share from {owner}, which is not a neighbour or is malformed")
            try:
                plain = decrypt_share(share_key(self.domain, self._enc, n.enc_pk, owner, self.node), self.domain,
                                      owner, self.node, blob)
            except InvalidTag:
                raise SecAggError(f"the share from {owner} does not decrypt: tampered with") from None
            if plain[:8] != owner.to_bytes(4, "big") + self.node.to_bytes(4, "big"):
                raise SecAggError(f"the share from {owner} names other devices")
            self._held[owner] = (plain[8:8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES:])
        return sorted(self._held)

    def mask(self, ring: np.ndarray) -> np.ndarray:
        """`ring` (uint32) + PRG(b) ± PRG(s_uv) for every neighbour that shared, modulo 2^32 (the
        caller reduces to the ring, contract.update.masked.RingEncoding)."""
        out = ring.astype(np.uint32, copy=True)
        add_mask(out, self_mask_key(self.domain, self._seed), +1)
        for v in self._held:
            add_mask(out, pair_mask_key(self.domain, self._mask, self.neighbours[v].mask_pk, self.node, v),
                     +1 if self.node < v else -1)
        return out

    def reveal(self, survivors: list[int], dropped: list[int]) -> dict[int, tuple[str, bytes]]:
        """For each owner, the share the server asks for: SELF for survivors, KEY for dropped ones.
        Refuses (SecAggError) a request that would give both kinds for one neighbour, now or
        together with an earlier answer, or one about devices that did not share with it."""
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggError(f"asked for both shares of {sorted(both)[:5]}: refused")
        wanted = {o: SELF for o in survivors} | {o: KEY for o in dropped}
        unknown = [o for o in wanted if o not in self._held]
        if unknown:
            raise SecAggError(f"holds no shares of {unknown[:5]}")
        flipped = [o for o, kind in wanted.items() if self.revealed.get(o, kind) != kind]
        if flipped:
            raise SecAggError(f"already revealed the other share of {flipped[:5]}: refused")
        self.revealed.update(wanted)
        return {o: (kind, self._held[o][0 if kind == SELF else 1]) for o, kind in wanted.items()}


# -- the server's half ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
    """What the server knows of one device of the masking set."""

    node: int
    mask_pk: bytes
    commitment: bytes
    maskers: frozenset[int]       # the neighbours it masked with (those that shared with it)


Reveal = bytes | tuple[str, bytes]    # a share, or (kind, share) as the revealer labelled it


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    secret: bytes
    wrong: frozenset[int]     # revealers whose share was wrong, malformed, of the other kind or not theirs


@dataclasses.dataclass(frozen=True)
class Unmasked:
    total: np.ndarray                     # the survivors' plaintext sum (uint32, modulo 2^32)
    wrong: dict[int, frozenset[int]]      # revealer → the owners whose shares it gave wrong (or had no share of)


def rebuild(owner: Member, kind: str, shares: Mapping[int, Reveal], t: int, domain: bytes,
            distrusted: frozenset[int] = frozenset()) -> Rebuilt:
    """The secret of `owner` from the revealed shares, checked, and who revealed wrongly.

    Only its maskers hold its shares, and only of `kind`: a share from anyone
    else, or labelled with the other kind, is set aside (a reveal "for the
    wrong neighbour"). The rest are Reed–Solomon decoded (contract.secagg.shamir.decode):
    with n of them, e wrong, the secret is rebuilt whenever n >= t + 2e, and
    the wrong ones named. `distrusted` revealers (wrong for another owner) are
    left out of the decoding when the rest suffice, and checked against it:
    one bad revealer costs one full decode, not one per owner.
    SecAggError names the owner when it cannot be rebuilt, or when what is
    rebuilt does not match its commitment or public key (more wrong shares,
    agreeing on a forgery, than can be corrected).
    """
    misdirected = frozenset(r for r, v in shares.items()
                            if r not in owner.maskers or (isinstance(v, tuple) and v[0] != kind))
    usable = {r: v[1] if isinstance(v, tuple) else v for r, v in shares.items() if r not in misdirected}
    try:
        decoded = shamir.decode(usable, t, distrusted)
    except ValueError as e:
        raise SecAggError(f"device {owner.node}: {len(usable)} usable {kind} shares cannot rebuild its "
                          f"secret ({e})", (owner.node,)) from None
    if not _matches(owner, kind, decoded.secret, domain):
        raise SecAggError(f"device {owner.node}: the {kind} secret rebuilt from {len(usable)} shares does not "
                          f"match its {'commitment' if kind == SELF else 'public key'} (more than (n - t) / 2 "
                          "of them are wrong)", (owner.node,))
    return Rebuilt(decoded.secret, misdirected | decoded.wrong)


def _matches(owner: Member, kind: str, secret: bytes, domain: bytes) -> bool:
    if kind == SELF:
        return commitment(domain, secret) == owner.commitment
    return public_bytes(X25519PrivateKey.from_private_bytes(secret)) == owner.mask_pk


def unmask_report(masked_sum: np.ndarray, members: dict[int, Member], survivors: set[int],
                  shares: Mapping[int, Mapping[int, Reveal]], t: int, domain: bytes) -> Unmasked:
    """The survivors' plaintext sum (uint32, modulo 2^32: the caller reduces to the ring), and the
    revealers whose shares were wrong.

    `masked_sum`: the sum of the survivors' masked vectors; `members`: the
    masking set (survivors and the devices that shared but did not submit);
    `shares[owner]`: {revealer: share or (kind, share)} of the owner's
    self-mask seed if it survived, of its masking key if not. Wrong shares
    are corrected where enough honest ones exist (`rebuild`); any secret that
    still cannot be rebuilt and checked raises SecAggError naming every such
    owner: nothing is unmasked from a partial set.
    """
    wrong: dict[int, set[int]] = {}
    for owner, given in shares.items():           # reveals about devices outside the masking set
        if owner not in members:
            for r in given:
                wrong.setdefault(r, set()).add(owner)
    secrets_, failed, messages = {}, [], []
    for o in sorted(members):
        try:
            rebuilt = rebuild(members[o], SELF if o in survivors else KEY, shares.get(o, {}), t, domain,
                              frozenset(wrong))
        except SecAggError as e:
            failed.append(o)
            messages.append(str(e))
            continue
        secrets_[o] = rebuilt.secret
        for r in rebuilt.wrong:
            wrong.setdefault(r, set()).add(o)
    named = {r: frozenset(owners) for r, owners in wrong.items()}
    if failed:
        raise SecAggError("; ".join(messages[:3]) + (f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""),
                          tuple(failed), named)
    return Unmasked(_remove_masks(masked_sum, members, survivors, secrets_, domain), named)


def unmask(masked_sum: np.ndarray, members: dict[int, Member], survivors: set[int],
           shares: Mapping[int, Mapping[int, Reveal]], t: int, domain: bytes) -> np.ndarray:
    """`unmask_report`'s sum alone (for callers that do not name wrong revealers)."""
    return unmask_report(masked_sum, members, survivors, shares, t, domain).total


def _remove_masks(masked_sum: np.ndarray, members: dict[int, Member], survivors: set[int],
                  secrets_: dict[int, bytes], domain: bytes) -> np.ndarray:
    total = masked_sum.astype(np.uint32)
    for u in survivors:
        add_mask(total, self_mask_key(domain, secrets_[u]), -1)
    for v in set(members) - survivors:
        private = X25519PrivateKey.from_private_bytes(secrets_[v])
        for u in members[v].maskers & survivors:
            # u added +PRG(s_uv) if u < v (−PRG if not); v's opposite term never came: take u's out
            add_mask(total, pair_mask_key(domain, private, members[u].mask_pk, v, u), -1 if u < v else +1)
    return total
