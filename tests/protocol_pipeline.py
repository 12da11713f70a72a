"""The independent implementation's update pipeline, written from PROTOCOL.md sections 7, 8 and 10.5–10.8.

Clip, weight, rotate, quantize (plain and on the secure grid), the bound
check and shrink loop, the upload body, the server's mean and its checks of
an unmasked sum. No `contract/` import: tests/protocol_encoding.py's streams
and packing, NumPy's float64 arithmetic.
"""
from __future__ import annotations

import math

import numpy as np

from tests.protocol_encoding import (FORMAT, PCG64, ROTATION_STREAM, ROUNDING_STREAM, Spec, f32_bytes, pack_codes,
                                     pack_words, safetensors)

ATTEMPTS = 10


def clip(x: np.ndarray, C: float) -> tuple[np.ndarray, int]:
    n = math.sqrt(float(np.dot(x, x)))
    return (x * (C / n), 0) if n > C else (x, 1)


def weight(x: np.ndarray, num_examples: int, weighting: str, W: int) -> tuple[np.ndarray, int]:
    w = 1 if weighting == "uniform" else min(int(num_examples), W)
    return x * (w / W), w


def _draws(P: int, seed: int) -> tuple[list[int], np.ndarray]:
    rng = PCG64([seed, ROTATION_STREAM])
    perm = rng.permutation(P)
    return perm, np.array(rng.bits(P), np.float64) * 2 - 1


def _butterflies(y: np.ndarray, B: int) -> np.ndarray:
    y = y.copy()
    h = 1
    while h < B:
        for start in range(0, len(y), 2 * h):
            a, b = y[start:start + h].copy(), y[start + h:start + 2 * h].copy()
            y[start:start + h], y[start + h:start + 2 * h] = a + b, a - b
        h *= 2
    return y * (1.0 / math.sqrt(B))


def rotate(x: np.ndarray, B: int, seed: int) -> np.ndarray:
    P = -(-len(x) // B) * B
    padded = np.zeros(P)
    padded[:len(x)] = x
    perm, signs = _draws(P, seed)
    return _butterflies(padded[perm] * signs, B)


def unrotate(z: np.ndarray, N: int, B: int, seed: int) -> np.ndarray:
    perm, signs = _draws(len(z), seed)
    y = _butterflies(np.asarray(z, np.float64), B) * signs
    out = np.zeros(len(z))
    out[perm] = y
    return out[:N]


def quantize(z: np.ndarray, bits: int, B: int, e_unit: int, e_max: int, seed: int) -> tuple[np.ndarray, list[int]]:
    L, u = 2 ** (bits - 1) - 1, PCG64([seed, ROUNDING_STREAM]).random(len(z))
    codes, exps = np.zeros(len(z), np.int64), []
    for j in range(0, len(z), B):
        peak = float(np.max(np.abs(z[j:j + B]))) / L
        if peak == 0:
            e = e_unit
        else:
            m, E = math.frexp(peak)
            e = E - 1 if m == 0.5 else E
        e = min(max(e, e_unit), e_max)
        exps.append(e)
        codes[j:j + B] = np.clip(np.floor(np.ldexp(z[j:j + B], -e) + u[j:j + B]), -L, L)
    return codes, exps


def quantized_norm(codes: np.ndarray, exps: list[int], B: int) -> float:
    return math.sqrt(sum(int(np.dot(codes[j * B:(j + 1) * B], codes[j * B:(j + 1) * B])) * 2.0 ** (2 * e)
                         for j, e in enumerate(exps)))


def grid(z: np.ndarray, bits: int, step: float, seed: int) -> tuple[np.ndarray, float]:
    L, u = 2 ** (bits - 1) - 1, PCG64([seed, ROUNDING_STREAM]).random(len(z))
    q = np.clip(np.floor(z / step + u), -L, L).astype(np.int64)
    return q, math.sqrt(float(np.dot(q, q))) * step


def _shrink(bound: float, norm: float, attempt: int) -> float:
    return bound / norm * (1 - min(1e-6 * 10**attempt, 0.5))


def front(spec: Spec, delta, num_examples: int) -> tuple[np.ndarray, int, int]:
    """Clip, then weight (7.2, 7.3): the weighted vector, w, and the unclipped bit."""
    x, unclipped = clip(np.asarray(delta, np.float64), spec.C)
    x, w = weight(x, num_examples, spec.json["weighting"], spec.W)
    return x, w, unclipped


def encode(spec: Spec, delta, num_examples: int, seed: int) -> tuple[bytes, int, float, np.ndarray, list[int]]:
    """A plain round's upload (7.4–7.9): body, weight, decoded norm, codes (or float32 values), exponents."""
    x, w, unclipped = front(spec, delta, num_examples)
    for attempt in range(ATTEMPTS + 1):
        if attempt == ATTEMPTS:
            x = np.zeros_like(x)
        if spec.bits == 32:
            values, exps = x.astype(np.float32), []
            norm = math.sqrt(float(np.dot(values.astype(np.float64), values.astype(np.float64))))
        else:
            z = rotate(x, spec.B, spec.seed) if spec.rotation else np.concatenate([x, np.zeros(spec.P - spec.N)])
            values, exps = quantize(z, spec.bits, spec.B, spec.e_unit, spec.e_max, seed)
            norm = quantized_norm(values, exps, spec.B)
        if norm <= spec.bound(w) or attempt == ATTEMPTS:
            break
        x = x * _shrink(spec.bound(w), norm, attempt)
    meta = {"format": FORMAT, "bits": str(spec.bits), "spec": spec.json["fingerprint"]}
    if spec.bits == 32:
        tensors = {"values": ("F32", [spec.N], f32_bytes(values))}
    else:
        packed = pack_codes(values, spec.bits)
        tensors = {"codes": ("U8", [len(packed)], packed),
                   "scales": ("F32", [len(exps)], f32_bytes([2.0 ** e for e in exps]))}
    if spec.dp:
        tensors["unclipped"] = ("U8", [1], bytes([unclipped]))
    return safetensors(tensors, meta), w, norm, values, exps


def units(spec: Spec, values: np.ndarray, exps: list[int]) -> np.ndarray:
    """What the server adds to its running sum for an update (section 8)."""
    if spec.bits == 32:
        return np.rint(np.ldexp(values.astype(np.float64), -spec.e_unit)).astype(np.int64)
    shifts = np.repeat(np.asarray(exps, np.int64) - spec.e_unit, spec.B)
    return np.asarray(values, np.int64) << shifts


def mean_of_sum(spec: Spec, total, weight_sum: int) -> np.ndarray:
    """Section 8: the round's mean from the running sum of units and Σw."""
    t = np.ldexp(np.asarray(total, np.int64).astype(np.float64), spec.e_unit)
    t = unrotate(t, spec.N, spec.B, spec.seed) if spec.rotation else t[:spec.N]
    return (t * (spec.W / weight_sum)).astype(np.float32)


def ring_plaintext(spec: Spec, delta, num_examples: int, seed: int) -> tuple[list[int], float]:
    """10.5: the ring vector before masking (no distributed noise: that needs the OS CSPRNG)."""
    x, w, unclipped = front(spec, delta, num_examples)
    bound = spec.masked_bound(w)
    for attempt in range(ATTEMPTS):
        q, norm = grid(rotate(x, spec.B, spec.seed), spec.bits, spec.step, seed)
        if norm <= bound:
            break
        x = x * _shrink(bound, norm, attempt)
    else:
        q, norm = np.zeros(spec.P, np.int64), 0.0
    ring = [(int(v) + spec.L) % 2**spec.m for v in q] + [w % 2**32]
    return ring + ([unclipped] if spec.dp else []), norm


def reduce(spec: Spec, words) -> list[int]:
    return [int(v) % (2**spec.m if i < spec.P else 2**32) for i, v in enumerate(words)]


def masked_body(spec: Spec, masked) -> bytes:
    """10.6: the upload of a masked vector (words modulo 2^32), reduced to the ring and packed."""
    ring = reduce(spec, masked)
    tail = np.asarray(ring[spec.P:], "<u4").tobytes()
    packed = pack_words(ring[:spec.P], spec.m)
    return safetensors({"masked": ("U8", [len(packed)], packed), "weight": ("U32", [len(ring) - spec.P], tail)},
                       {"format": FORMAT, "bits": str(spec.bits), "modulus_bits": str(spec.m),
                        "spec": spec.json["fingerprint"]})


def decode_masked(spec: Spec, ring_sum, n: int) -> tuple[int, np.ndarray] | str:
    """10.8: Σw and the mean from an unmasked sum of n reports, or the name of the check it fails."""
    ring = reduce(spec, ring_sum)
    w = ring[spec.P]
    half = 2 ** (spec.m - 1)
    c = np.array([((v - n * spec.L) % 2**spec.m) - (2**spec.m if (v - n * spec.L) % 2**spec.m >= half else 0)
                  for v in ring[:spec.P]], np.int64)
    if not n <= w <= n * spec.W:
        return "weight_sum"
    if np.abs(c).max(initial=0) > n * spec.L:
        return "coordinate"
    limit = min(n * spec.C, spec.C * w / spec.W + spec.R * math.sqrt(n * w / spec.W))
    if math.sqrt(float(np.dot(c, c))) * spec.step > limit * (1 + 1e-9):
        return "norm"
    t = unrotate(c.astype(np.float64) * spec.step, spec.N, spec.B, spec.seed)
    return w, (t * (spec.W / w)).astype(np.float32)
