"""The independent implementation's encodings, written from PROTOCOL.md alone (tests/protocol_impl.py).

Canonical JSON (section 3), NumPy's seeded streams (Appendix A: SeedSequence,
PCG64 and the three Generator methods, in pure Python), bit packing
(Appendix B), safetensors by hand (Appendix C) and the round spec's derived
numbers (7.1, 10.5). Nothing here imports `contract/` or `device_runtime/`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import struct

import numpy as np

M32, M64, M128 = 2**32 - 1, 2**64 - 1, 2**128 - 1
ROTATION_STREAM, ROUNDING_STREAM = 0x48414441, 0x53524E44
FORMAT = "nightjar-update-1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(value) -> bytes:
    """PROTOCOL.md section 3 (Python's json with sorted keys and no whitespace is exactly that)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# -- Appendix A: NumPy's seeded streams -----------------------------------------------------------

def _words(entropy) -> list[int]:
    out = []
    for n in entropy:
        if n == 0:
            out.append(0)
        while n > 0:
            out.append(n & M32)
            n >>= 32
    return out


def seed_state(entropy, n: int) -> list[int]:
    """SeedSequence(entropy).generate_state(n, uint64)."""
    ent, h = _words(entropy), [0x43b0d7e5]

    def hashmix(v: int) -> int:
        v ^= h[0]
        h[0] = h[0] * 0x931e8875 & M32
        v = v * h[0] & M32
        return v ^ (v >> 16)

    def mix(x: int, y: int) -> int:
        r = (0xca01f9dd * x - 0x4973f715 * y) & M32
        return r ^ (r >> 16)

    pool = [hashmix(ent[i] if i < len(ent) else 0) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(4, len(ent)):
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(ent[src]))
    words, hc = [], 0x8b51f9dd
    for k in range(2 * n):
        v = pool[k % 4] ^ hc
        hc = hc * 0x58f38ded & M32
        v = v * hc & M32
        words.append(v ^ (v >> 16))
    return [words[2 * j] | words[2 * j + 1] << 32 for j in range(n)]


class PCG64:
    """numpy.random.default_rng(entropy)'s bit generator and the three Generator methods used."""

    def __init__(self, entropy):
        s = seed_state(entropy, 4)
        self.inc = (((s[2] << 64) | s[3]) << 1 | 1) & M128
        self.state = 0
        self._step()
        self.state = (self.state + ((s[0] << 64) | s[1])) & M128
        self._step()
        self.half: int | None = None

    def _step(self) -> None:
        self.state = (self.state * 0x2360ED051FC65DA44385DF649FCCF645 + self.inc) & M128

    def next_uint64(self) -> int:
        self._step()
        x, r = ((self.state >> 64) ^ self.state) & M64, self.state >> 122
        return ((x >> r) | (x << (64 - r))) & M64

    def next_uint32(self) -> int:
        if self.half is not None:
            value, self.half = self.half, None
            return value
        v = self.next_uint64()
        self.half = v >> 32
        return v & M32

    def random(self, n: int) -> np.ndarray:
        return np.array([(self.next_uint64() >> 11) * 2.0**-53 for _ in range(n)], np.float64)

    def permutation(self, n: int) -> list[int]:
        a = list(range(n))
        for i in range(n - 1, 0, -1):
            mask = (1 << i.bit_length()) - 1
            while True:
                j = (self.next_uint32() if i <= M32 else self.next_uint64()) & mask
                if j <= i:
                    break
            a[i], a[j] = a[j], a[i]
        return a

    def bits(self, n: int) -> list[int]:
        return [self.next_uint32() >> 31 for _ in range(n)]


# -- Appendices B and C: packing, safetensors -------------------------------------------------------

def pack_words(values, bits: int) -> bytes:
    total = 0
    for i, v in enumerate(values):
        total |= int(v) << (bits * i)
    return total.to_bytes(-(-len(values) * bits // 8), "little")


def unpack_words(data: bytes, bits: int, count: int) -> list[int]:
    total = int.from_bytes(data, "little")
    return [(total >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]


def pack_codes(codes, bits: int) -> bytes:
    L = 2 ** (bits - 1) - 1
    shifted = [int(q) + L for q in codes]
    if bits == 16:
        return b"".join(struct.pack("<H", c) for c in shifted)
    return pack_words(shifted, bits)


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    header, data = {"__metadata__": metadata}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def read_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, list[int], bytes]]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    body = data[8 + n:]
    return metadata, {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
                      for k, v in header.items()}


def f32_bytes(values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


# -- section 7.1: the round spec and what a phone derives from it ----------------------------------

def bind(update: dict, size: int, layout_sha256: str, round_key: str, rotation_seed: int, cohort_max: int = 0,
         dp=None) -> dict:
    """The assignment's `update` object for these settings, with its fingerprint (7.1)."""
    secure = bool(update.get("secure_aggregation", False))
    out = {"bits": int(update.get("bits", 8)), "rotation": bool(update.get("rotation", False)),
           "clip_norm": float(update.get("clip_norm", 2.5)), "weighting": update.get("weighting", "examples"),
           "max_weight": 1 if update.get("weighting") == "uniform" else int(update.get("max_weight", 317)),
           "block_size": int(update.get("block_size", 1024)), "secure_aggregation": secure}
    if update.get("aggregator", "mean") != "mean":
        out.update(aggregator=update["aggregator"], trim=float(update.get("trim", 0.1)))
    out.update(size=size, layout_sha256=layout_sha256, round_key=round_key, rotation_seed=rotation_seed,
               cohort_max=cohort_max if secure else 0)
    if dp:
        out.update(dp_mechanism=dp[0], dp_stddev=float(dp[1]), dp_denominator=int(dp[2]),
                   dp_count_stddev=float(dp[3]))
    out["fingerprint"] = fingerprint(out)
    return out


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in spec.items() if k != "fingerprint"})).hexdigest()


class Spec:
    """The numbers of 7.1, 10.5 and 10.8 from an assignment's `update` object."""

    def __init__(self, update: dict):
        self.json = update
        self.bits, self.C, self.W = update["bits"], update["clip_norm"], update["max_weight"]
        self.B, self.N, self.seed = update["block_size"], update["size"], update["rotation_seed"]
        self.secure, self.rotation = update.get("secure_aggregation", False), update["rotation"]
        self.P = -(-self.N // self.B) * self.B
        self.L = 2 ** (self.bits - 1) - 1 if self.bits < 32 else 0
        self.e_unit = math.ceil(math.log2(self.C)) - 40
        self.e_max = math.ceil(math.log2(self.C / self.L)) if self.L else None
        self.dp = update.get("dp_mechanism", "")
        if self.secure:
            self.step = 4.0 * self.C / math.sqrt(self.P) / self.L
            self.R = 1.25 * self.C * math.sqrt(4.0 / self.L)
            span = update["cohort_max"] * self.L
            if self.dp == "distributed":
                span += 10 * (update["dp_stddev"] / self.step / math.sqrt(update["dp_denominator"])) \
                    * math.sqrt(update["cohort_max"])
            self.m = max(1, math.ceil(math.log2(2 * span + 1)))

    def bound(self, w: int) -> float:
        return self.C * min(max(w, 0), self.W) / self.W

    def masked_bound(self, w: int) -> float:
        f = min(max(w, 0), self.W) / self.W
        return min(self.C, self.C * f + self.R * math.sqrt(f))

    def derived(self, weights) -> dict:
        out = {"fingerprint": fingerprint(self.json), "padded": self.P, "levels": self.L, "unit_exponent": self.e_unit,
               "weight_cap": self.W, "clip_bound": {str(w): self.bound(w) for w in weights}}
        if self.L and not self.secure:
            out["max_exponent"] = self.e_max
        if self.secure:
            out.update(grid_step=self.step, modulus_bits=self.m, grid_rounding=self.R,
                       masked_bound={str(w): self.masked_bound(w) for w in weights})
        return out
