"""Reed–Solomon decoding over GF(p): the polynomial behind a set of Shamir shares, some of them wrong.

Shamir shares (contract.secagg.shamir) are the values f(x_i) of a polynomial
of degree < k (k = the threshold) at distinct points: a Reed–Solomon
codeword. Any k of them fix f, so one wrong share among exactly k goes
unnoticed (the rebuilt secret is just wrong); with n shares of which e are
wrong, f is still the only polynomial of degree < k within e of them when
n >= k + 2e, and `decode` finds it, and so the wrong ones.

Why Gao's algorithm (Gao 2003, "A new algorithm for decoding Reed–Solomon
codes"): it is the shortest correct decoder to write and read — interpolate
all n points, run the extended Euclidean algorithm on (Π(x − x_i), that
interpolant) until the remainder's degree drops below (n + k)/2, and divide
the remainder by its cofactor — with O(n²) field operations. Honest shares
need none of it: `consistent` tells, with one random parity check, that the
points lie on one polynomial of degree < k, and `values_at` reads its value
at 0 (and wherever else asked) from k of them; both cost O(n²) multiplications of small integers and
O(n) in the field (the holders' x are their small node numbers).

Polynomials are lists of coefficients, lowest degree first, reduced modulo
`p`, without trailing zeros (the zero polynomial is []).
"""
from __future__ import annotations

from collections.abc import Sequence

Poly = list[int]


class DecodingError(ValueError):
    """More wrong shares than the points can correct (or too few points)."""


def _trim(a: Poly) -> Poly:
    while a and a[-1] == 0:
        a.pop()
    return a


def _sub(a: Poly, b: Poly, p: int) -> Poly:
    out = [(x - y) % p for x, y in zip(a, b)]
    out += [x % p for x in a[len(b):]] + [-y % p for y in b[len(a):]]
    return _trim(out)


def _mul(a: Poly, b: Poly, p: int) -> Poly:
    if not a or not b:
        return []
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return _trim([c % p for c in out])


def _divmod(a: Poly, b: Poly, p: int) -> tuple[Poly, Poly]:
    """Quotient and remainder of a by b (b != 0)."""
    rem, inverse = list(a), pow(b[-1], -1, p)
    quotient = [0] * max(len(a) - len(b) + 1, 0)
    for shift in range(len(a) - len(b), -1, -1):
        c = rem[shift + len(b) - 1] * inverse % p
        quotient[shift] = c
        if c:
            for j, y in enumerate(b):
                rem[shift + j] = (rem[shift + j] - c * y) % p
    return _trim(quotient), _trim(rem[:len(b) - 1])


def evaluate(a: Poly, x: int, p: int) -> int:
    """a(x) by Horner's rule."""
    y = 0
    for c in reversed(a):
        y = (y * x + c) % p
    return y


def _vanishing(xs: Sequence[int], p: int) -> Poly:
    """Π (x − x_i): zero exactly at the points."""
    out = [1]
    for x in xs:                      # multiply by (x − x_i): shift up, subtract x_i times
        out = [(shifted - x * same) % p for shifted, same in zip([0] + out, out + [0])]
    return out


def interpolate(xs: Sequence[int], ys: Sequence[int], p: int) -> Poly:
    """The polynomial of degree < len(xs) through the points (Lagrange, O(n²))."""
    g = _vanishing(xs, p)
    out = [0] * len(xs)
    for xi, yi in zip(xs, ys):
        quotient, carry = [0] * len(xs), 0      # g / (x − x_i) by synthetic division (exact)
        for j in range(len(xs), 0, -1):
            carry = (g[j] + carry * xi) % p
            quotient[j - 1] = carry
        scale = yi * pow(evaluate(quotient, xi, p), -1, p) % p
        for j, c in enumerate(quotient):
            out[j] = (out[j] + scale * c) % p
    return _trim(out)


def _batch_inverse(values: Sequence[int], p: int) -> list[int]:
    """The inverses of nonzero values modulo p with one modular inversion (Montgomery's trick)."""
    prefix, acc = [], 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % p
    inverse, out = pow(acc, -1, p), [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % p
        inverse = inverse * values[i] % p
    return out


def _differences(xs: Sequence[int]) -> list[int]:
    """Π_{j≠i} (x_i − x_j) for each i, as exact integers: holders' numbers are small, so the products
    cost a few big-by-small multiplications and no modular reduction."""
    out = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if i != j:
                d *= xi - xj
        out.append(d)
    return out


def values_at(xs: Sequence[int], ys: Sequence[int], points: Sequence[int], p: int) -> list[int]:
    """f(x0) for each x0 in `points`, f the polynomial of degree < len(xs) through the points
    (Lagrange: Σ_i y_i Π_{j≠i} (x0 − x_j) / (x_i − x_j), the products in exact integers)."""
    weights = [y * w % p for y, w in zip(ys, _batch_inverse([d % p for d in _differences(xs)], p))]
    out = []
    for x0 in points:
        if x0 in xs:
            out.append(ys[list(xs).index(x0)] % p)
            continue
        total = 1
        for xj in xs:
            total *= x0 - xj
        out.append(sum(w * (total // (x0 - xi)) for xi, w in zip(xs, weights)) % p)
    return out


def consistent(xs: Sequence[int], ys: Sequence[int], k: int, p: int, r: int) -> bool:
    """Whether the points lie on one polynomial of degree < k — checked with one random parity
    check of the code instead of n − k.

    Σ_i y_i x_i^j / Π_{j'≠i}(x_i − x_j') is 0 for j < n − k when they do (it is
    the top coefficient of an interpolant of degree < n − 1). This sums those
    checks weighted by r^j, for a secret random r: points off the code pass
    with probability <= (n − k) / p.
    """
    m = len(xs) - k
    if m <= 0:
        return True
    weights = _batch_inverse([d % p for d in _differences(xs)], p)
    z = [r * x % p for x in xs]
    ratios = _batch_inverse([(zi - 1) % p or 1 for zi in z], p)
    total = 0
    for y, w, zi, ratio in zip(ys, weights, z, ratios):
        series = m if zi == 1 else (pow(zi, m, p) - 1) * ratio % p      # Σ_{j<m} z^j
        total += y * w % p * series
    return total % p == 0


def decode(xs: Sequence[int], ys: Sequence[int], k: int, p: int) -> tuple[Poly, list[int]]:
    """f of degree < k agreeing with all but at most (n − k) // 2 of the points, and the x of every
    point it disagrees with; DecodingError if there is none (more errors than n >= k + 2e allows).

    The points' xs must be distinct and nonzero modulo p.
    """
    n = len(xs)
    if len(set(x % p for x in xs)) != n or any(x % p == 0 for x in xs) or len(ys) != n:
        raise DecodingError("the points need distinct, nonzero x")
    if not 1 <= k <= n:
        raise DecodingError(f"{n} points cannot fix a polynomial of {k} coefficients")
    f = _gao(xs, ys, k, p)
    wrong = [x for x, y in zip(xs, ys) if evaluate(f, x, p) != y % p]
    if 2 * len(wrong) > n - k:
        raise DecodingError(f"{len(wrong)} of {n} points disagree: at most {(n - k) // 2} can be corrected")
    return f, wrong


def _gao(xs: Sequence[int], ys: Sequence[int], k: int, p: int) -> Poly:
    """Gao's decoder: partial extended Euclid on (g0, g1) until deg r < (n + k) / 2, then f = r / v."""
    n = len(xs)
    r0, r1 = _vanishing(xs, p), interpolate(xs, ys, p)
    v0: Poly = []
    v1: Poly = [1]
    while 2 * (len(r1) - 1) >= n + k:           # deg r1 >= (n + k) / 2
        q, r = _divmod(r0, r1, p)
        r0, r1 = r1, r
        v0, v1 = v1, _sub(v0, _mul(q, v1, p), p)
    f, rem = _divmod(r1, v1, p)
    if rem or len(f) > k:
        raise DecodingError(f"the {n} points are further than {(n - k) // 2} errors from any polynomial "
                            f"of degree < {k}")
    return f
