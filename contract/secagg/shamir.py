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
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**521 - 1
SHARE_BYTES = 66                  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of `secret` for the holders `xs` (distinct, 1 <= x < p), any `threshold` of them enough."""
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share holders need distinct indices in [1, p)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (the number of holders)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):        # Horner: f(x) = c0 + x(c1 + x(c2 + ...))
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0); ValueError if fewer
    or malformed. With shares that were tampered with, the result is some other value: callers
    check it against a commitment (contract.secagg.masking does)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    points = []
    for x, raw in list(shares.items())[:threshold]:
        if len(raw) != SHARE_BYTES or not 0 < x < PRIME:
            raise ValueError(f"share of holder {x} is malformed")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise ValueError(f"share of holder {x} is not a field element")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("the shares do not rebuild a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
