"""The stages of a round under secure aggregation: one grid, integers modulo 2^m, a masked body.

Masked updates can only be added as integers on a grid that every device
of the round shares, so these replace Quantization and WireFormat
(contract.update.stages) when the round spec says `secure_aggregation`:
Clipping → Weighting → Rotation → GridQuantization (→ DistributedNoise) →
RingEncoding → MaskedWireFormat. The device masks the ring's integers
(contract.secagg.masking) before they are packed; the server can check only
the body's shape, adds the bodies modulo 2^m, and decodes the unmasked sum
once, after checking that honest devices could have sent it
(contract.secagg.plausible).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from safetensors.numpy import save as st_save

from contract.protocol.errors import ErrorCode, ProtocolError
from contract.update.packing import levels, pack_uint, unpack_uint
from contract.update.stages import FORMAT, ROUNDING_STREAM, Context, Stage, _check_meta, _load

WEIGHT_BITS = 32                        # the weight (and DP's count) is summed modulo 2^32


@dataclasses.dataclass(frozen=True)
class GridQuantization(Stage):
    """Stochastic rounding to b-bit integers on one grid for the whole round (secure aggregation).

    Masked updates can only be added as integers on a grid that every device
    of the round shares (TFF's distributed DP discretizes the same way). The
    step is fixed by the round's spec (`RoundSpec.grid_step`); after the
    rotation a coordinate of an update of norm C is about C/sqrt(n), and the
    grid spans a few times that. A value beyond ±L·step saturates at ±L.
    """

    bits: int
    step: float

    def encode(self, z: np.ndarray, ctx: Context) -> np.ndarray:
        u = np.random.default_rng([ctx.seed, ROUNDING_STREAM]).random(len(z))
        L = levels(self.bits)
        return np.clip(np.floor(z / self.step + u), -L, L).astype(np.int32)

    def norm(self, q: np.ndarray) -> float:
        """The L2 norm of what the integers decode to (exact in integers, then scaled)."""
        wide = q.astype(np.int64)
        return math.sqrt(float(np.dot(wide, wide))) * self.step

    def decode(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        return units.astype(np.float64) * self.step


@dataclasses.dataclass(frozen=True)
class RingEncoding(Stage):
    """The integers secure aggregation adds: each code + L modulo 2^m, then the weight modulo 2^32.

    A device's codes + L lie in 0..2L and the weights in 1..W, and m is
    chosen so that the sum over the largest cohort cannot wrap
    (`RoundSpec.modulus_bits`). The device's masker (contract.secagg.masking) adds
    its masks to this vector before it is packed.
    """

    bits: int
    count: int
    modulus_bits: int
    indicator: bool = False     # DP: the "unclipped" bit follows the weight, masked and summed modulo 2^32

    @property
    def tail(self) -> int:
        """Slots after the codes: the weight, and the bit under DP."""
        return 1 + int(self.indicator)

    def reduce(self, ring: np.ndarray) -> np.ndarray:
        """`ring` (any integer dtype) reduced in place: the codes modulo 2^m, the weight modulo 2^32."""
        ring[:self.count] &= (1 << self.modulus_bits) - 1
        ring[self.count:] &= (1 << WEIGHT_BITS) - 1
        return ring

    def encode(self, q: np.ndarray, ctx: Context) -> np.ndarray:
        if ctx.masker is None:
            raise ValueError("a round under secure aggregation needs the session's masker")
        wide = np.empty(self.count + self.tail, np.int64)      # noised codes may leave 0..2L: reduced below
        wide[:self.count] = q.astype(np.int64) + levels(self.bits)
        wide[self.count] = ctx.weight
        if self.indicator:
            wide[self.count + 1] = ctx.unclipped if ctx.count_value is None else ctx.count_value
        ring = self.reduce(wide).astype(np.uint32)
        return self.reduce(ctx.masker(ring))

    def accept(self, ring: np.ndarray, ctx: Context) -> np.ndarray:
        ctx.masked = True
        return ring.astype(np.int64)

    def decode(self, total: np.ndarray, ctx: Context) -> np.ndarray:
        """The codes' sum from the unmasked sum of `ctx.survivors` updates; Σw into `ctx`."""
        ctx.weight_sum = int(total[self.count])
        if self.indicator:
            ctx.unclipped_sum = int(_centered(np.array([total[self.count + 1]], np.int64), WEIGHT_BITS)[0])
        codes = total[:self.count].astype(np.int64) - ctx.survivors * levels(self.bits)
        return _centered(codes, self.modulus_bits)


def _centered(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` modulo 2^bits, as the representatives in [-2^(bits-1), 2^(bits-1)): the sum of codes in
    -L..L (and noise) lies there by the choice of the modulus (RoundSpec.modulus_bits)."""
    v = values & ((1 << bits) - 1)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


@dataclasses.dataclass(frozen=True)
class MaskedWireFormat(Stage):
    """A masked upload: the m-bit values bit-packed, the weight as one uint32, and metadata."""

    bits: int
    count: int
    modulus_bits: int
    fingerprint: str
    tail: int = 1               # uint32 slots after the codes (RingEncoding.tail)

    def encode(self, ring: np.ndarray, ctx: Context) -> bytes:
        tensors = {"masked": pack_uint(ring[:self.count], self.modulus_bits),
                   "weight": np.ascontiguousarray(ring[self.count:], "<u4")}
        return st_save(tensors, metadata={"format": FORMAT, "bits": str(self.bits),
                                          "modulus_bits": str(self.modulus_bits), "spec": self.fingerprint})

    def accept(self, body: bytes, ctx: Context) -> np.ndarray:
        tensors, meta = _load(body)
        _check_meta(meta, self.fingerprint, self.bits)
        if meta.get("modulus_bits") != str(self.modulus_bits):
            raise ProtocolError(ErrorCode.WRONG_WIDTH, f"this round's masked values have "
                                f"{self.modulus_bits} bits, not {meta.get('modulus_bits')!r}")
        if set(tensors) != {"masked", "weight"}:
            raise ProtocolError(ErrorCode.MALFORMED_UPDATE, "a masked update holds exactly the tensors "
                                f"['masked', 'weight'], got {sorted(tensors)[:5]}")
        weight = tensors["weight"]
        if weight.dtype != np.uint32 or weight.shape != (self.tail,):
            raise ProtocolError(ErrorCode.WRONG_LENGTH, f"'weight' must be uint32 [{self.tail}]")
        ring = np.empty(self.count + self.tail, np.uint32)
        ring[:self.count] = unpack_uint(tensors["masked"], self.modulus_bits, self.count)
        ring[self.count:] = weight
        return ring
