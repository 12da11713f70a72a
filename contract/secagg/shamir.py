"""Shamir secret sharing over a prime field: t of n shares rebuild a 32-byte secret, t − 1 learn nothing.

Secure aggregation (contract.secagg.masking) splits two secrets of each device — the
seed of its self mask and its masking private key — among its neighbours,
so that the server can rebuild exactly one of them when the device drops
out or survives, and only with the help of `threshold` neighbours.

The field is GF(p) with p = 2^521 − 1 (a Mersenne prime, larger than any
256-bit secret). A secret is the big-endian integer of its bytes; a share is
the pair (x, f(x)) of a random polynomial f of degree threshold − 1 with
f(0) = secret, its coefficients drawn from the OS CSPRNG (`secrets`). x is
the holder's index in the round's neighbour graph (1..n, never 0). Shares
go on the wire as SHARE_BYTES big-endian bytes of f(x).

`decode` does not trust the shares it is given: with n shares of which e are
wrong it rebuilds the secret whenever n >= threshold + 2e (Reed–Solomon
decoding, contract.secagg.reed_solomon) and says whose shares were wrong.
"""
from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Mapping, Sequence

from contract.secagg import reed_solomon

PRIME = 2**521 - 1
SHARE_BYTES = 66                  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: Iterable[int],
          coefficients: Sequence[int] | None = None) -> dict[int, bytes]:
    """Shares of `secret` for the holders `xs` (distinct, 1 <= x < p), any `threshold` of them enough.

    `coefficients` (c_1 .. c_{t-1}, each in [0, p)) are drawn from the OS CSPRNG unless given: only
    known-answer vectors (contract.vectors) give them."""
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share holders need distinct indices in [1, p)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (the number of holders)")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1 or not all(0 <= c < PRIME for c in coefficients):
        raise ValueError(f"a {threshold}-of-n sharing takes {threshold - 1} coefficients in [0, p)")
    coefficients = [int.from_bytes(secret, "big"), *coefficients]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):        # Horner: f(x) = c0 + x(c1 + x(c2 + ...))
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


@dataclasses.dataclass(frozen=True)
class Decoded:
    secret: bytes
    wrong: frozenset[int]       # the holders whose shares were not on the secret's polynomial


def decode(shares: Mapping[int, bytes], threshold: int, suspects: Iterable[int] = ()) -> Decoded:
    """The secret from shares of which some may be wrong, and who sent the wrong ones.

    Any `threshold` correct shares fix the secret; fewer learn nothing of it.
    A malformed share (wrong length, not a field element) is set aside first
    (an erasure: it costs one share, a wrong value costs two). ValueError if
    the rest cannot be corrected — fewer than threshold + 2e well-formed shares
    for e wrong ones — or rebuild a value that is not 32 bytes. With exactly
    `threshold` shares nothing can be checked: a wrong one gives some other
    value. `suspects` (holders known to have lied about other secrets) are
    left out of the decoding when the rest suffice, and checked against its
    result. A result is unique but not proof against holders that agree on a
    forgery (more than (n − threshold) / 2 of them): callers still check the
    secret against its commitment, as contract.secagg.masking does.
    """
    malformed = frozenset(x for x, raw in shares.items() if len(raw) != SHARE_BYTES or not 0 < x < PRIME
                          or int.from_bytes(raw, "big") >= PRIME)
    ys = {x: int.from_bytes(raw, "big") for x, raw in shares.items() if x not in malformed}
    good, suspects = sorted(ys), set(suspects)
    if len(good) < threshold:
        raise ValueError(f"{len(good)} well-formed shares ({len(malformed)} malformed), fewer than the "
                         f"threshold {threshold}")
    trusted = [x for x in good if x not in suspects]
    if len(trusted) < len(good) and len(trusted) >= threshold:
        try:
            return _decode(ys, trusted, [x for x in good if x in suspects], threshold, malformed)
        except ValueError:
            pass              # not without them: decode them with the rest
    return _decode(ys, good, [], threshold, malformed)


def _decode(ys: dict[int, int], xs: list[int], extra: list[int], threshold: int,
            malformed: frozenset[int]) -> Decoded:
    """Decode the points at `xs`; check the `extra` ones against the result."""
    values = [ys[x] for x in xs]
    if reed_solomon.consistent(xs, values, threshold, PRIME, secrets.randbelow(PRIME)):
        at = reed_solomon.values_at(xs[:threshold], values[:threshold], [0] + extra, PRIME)
        wrong = []
    else:
        try:
            f, wrong = reed_solomon.decode(xs, values, threshold, PRIME)
        except reed_solomon.DecodingError as err:
            raise ValueError(str(err)) from None
        at = [reed_solomon.evaluate(f, x, PRIME) for x in [0] + extra]
    wrong += [x for x, v in zip(extra, at[1:]) if v != ys[x]]
    if at[0] >= 1 << (8 * SECRET_BYTES):
        raise ValueError("the shares do not rebuild a 32-byte secret")
    return Decoded(at[0].to_bytes(SECRET_BYTES, "big"), frozenset(wrong) | malformed)
