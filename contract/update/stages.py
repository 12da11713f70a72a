"""The update pipeline's stages, each with both halves (composed in contract.update.pipeline).

`encode` runs on the device, `accept` on the server for each update before
it joins the round's sum (decoding and checking what it can see), `decode`
on the server once, on the sum, when the round closes. Every stage here is
`linear` (decoding a sum equals summing the decoded updates): that is what
lets the server add updates it cannot see, under secure aggregation.

Plain rounds: Clipping → Weighting → Rotation → Quantization (or
Float32Values) → WireFormat. Rounds under secure aggregation
(contract.secagg.masking) quantize on one grid for the whole round instead of a
scale per block and device (`GridQuantization`), turn the codes and the
weight into integers modulo 2^m that the device masks (`RingEncoding`), and
send them bit-packed at m bits (`MaskedWireFormat`); the server can check
only their shape, and decodes the unmasked sum once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contract.protocol.errors import ErrorCode, ProtocolError
from contract.update.hadamard import padded_size, rotate, unrotate
from contract.update.packing import levels, pack, pack_uint, unpack, unpack_uint

FORMAT = "nightjar-update-1"
ROUNDING_STREAM = 0x53524E44            # "SRND": the session seed's stream for stochastic rounding
WEIGHT_BITS = 32                        # under secure aggregation the weight is summed modulo 2^32


@dataclasses.dataclass
class Context:
    """What flows through the stages besides the value itself."""

    num_examples: int = 1       # device: its local examples; server: the weight it claimed
    seed: int = 0               # device: the session's seed (stochastic rounding)
    weight: int = 1             # the update's weight after the cap
    weight_sum: int = 0         # server, decode: Σ weights of the round's accepted updates
    norm: float = 0.0           # server, accept: the decoded update's L2 norm
    masked: bool = False        # server, accept: the update is masked (secure aggregation): unreadable
    survivors: int = 0          # server, decode under secure aggregation: updates in the unmasked sum
    masker: Callable[[np.ndarray], np.ndarray] | None = None   # device: adds the session's masks
    unclipped: int = 0          # device: 1 if the update's norm was within the clip (DP's adaptive clip)
    unclipped_sum: float = 0    # server, decode under DP: how many of the summed updates were unclipped
    count_value: int | None = None   # device, distributed DP: the noised COUNT_SCALE × unclipped it masks
    random: object | None = None   # server, decode: a contract.dp.noise.SecureRandom (tests pass a keyed one)


class Stage:
    """A pipeline stage; the defaults pass the value through unchanged."""

    linear = True

    def encode(self, value, ctx: Context):
        return value

    def accept(self, value, ctx: Context):
        return value

    def decode(self, value, ctx: Context):
        return value


@dataclasses.dataclass(frozen=True)
class Weighting(Stage):
    mode: str
    cap: int                    # W
    denominator: int = 0        # DP: the mean divides by this (the expected reports), not by Σw

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        if ctx.num_examples < 1:
            raise ValueError("an update needs at least one example")
        ctx.weight = 1 if self.mode == "uniform" else min(int(ctx.num_examples), self.cap)
        return x * (ctx.weight / self.cap)

    def accept(self, value, ctx: Context):
        if ctx.masked:          # the weight travels masked inside the update; the unmasked sum holds Σw
            return value
        if not 1 <= ctx.num_examples <= self.cap:
            raise ProtocolError(ErrorCode.WEIGHT_OUT_OF_RANGE,
                                f"num_examples must be in [1, max_weight = {self.cap}]")
        ctx.weight = int(ctx.num_examples)
        return value

    def decode(self, total: np.ndarray, ctx: Context) -> np.ndarray:
        if ctx.weight_sum < 1:
            raise ValueError("no update was accepted")
        return total * (self.cap / (self.denominator or ctx.weight_sum))


@dataclasses.dataclass(frozen=True)
class Clipping(Stage):
    clip_norm: float
    unit_exponent: int

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        norm = float(np.linalg.norm(x))
        ctx.unclipped = int(norm <= self.clip_norm)
        return x * (self.clip_norm / norm) if norm > self.clip_norm else x

    def accept(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        """Refuse an update whose decoded norm (measured by the stage that decoded it) exceeds C."""
        if ctx.masked:          # unreadable by design: the device clipped it (contract.secagg.masking's threat model)
            return units
        if not ctx.norm <= self.clip_norm:
            raise ProtocolError(ErrorCode.NORM_EXCEEDS_CLIP, f"the update's L2 norm {ctx.norm:.6g} "
                                f"exceeds clip_norm = {self.clip_norm:g}")
        return units


@dataclasses.dataclass(frozen=True)
class Rotation(Stage):
    """Blocks of `block` values; randomized Hadamard rotation if `enabled`, else padding only."""

    size: int
    block: int
    seed: int
    enabled: bool

    @property
    def padded(self) -> int:
        return padded_size(self.size, self.block)

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        if self.enabled:
            return rotate(x, self.block, self.seed)
        out = np.zeros(self.padded, np.float64)
        out[:self.size] = x
        return out

    def decode(self, z: np.ndarray, ctx: Context) -> np.ndarray:
        return unrotate(z, self.size, self.block, self.seed) if self.enabled else z[:self.size]


@dataclasses.dataclass(frozen=True)
class Quantization(Stage):
    """Stochastic rounding to b-bit integers with one power-of-two scale per block."""

    bits: int
    block: int
    unit_exponent: int          # e_unit: the smallest scale exponent, and the sum's unit
    max_exponent: int           # the largest scale exponent an honest device needs (|value| <= C)

    def exponents(self, z: np.ndarray) -> np.ndarray:
        """Per block, the smallest e in [e_unit, e_max] with max|value| <= L·2^e."""
        peak = np.abs(z).reshape(-1, self.block).max(axis=1) / levels(self.bits)
        mantissa, e = np.frexp(peak)                    # peak = mantissa·2^e, mantissa in [0.5, 1)
        e = np.where(mantissa == 0.5, e - 1, e)          # an exact power of two needs no more
        return np.clip(np.where(peak > 0, e, self.unit_exponent), self.unit_exponent,
                       self.max_exponent).astype(np.int64)

    def encode(self, z: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        e = self.exponents(z)
        scaled = np.ldexp(z.reshape(-1, self.block), -e[:, None]).reshape(-1)
        u = np.random.default_rng([ctx.seed, ROUNDING_STREAM]).random(len(z))
        q = np.floor(scaled + u)
        L = levels(self.bits)
        return np.clip(q, -L, L).astype(np.int32), e

    def accept(self, value: tuple[np.ndarray, np.ndarray], ctx: Context) -> np.ndarray:
        """The integers in the sum's units (q·2^(e − e_unit)), and the decoded norm into `ctx`."""
        q, e = value
        blocks = q.reshape(-1, self.block)
        squares = np.einsum("ij,ij->i", blocks, blocks) if self.bits <= 8 else \
            np.einsum("ij,ij->i", blocks.astype(np.int64), blocks.astype(np.int64))   # exact integers
        ctx.norm = math.sqrt(float(np.dot(squares.astype(np.float64), np.ldexp(1.0, 2 * e))))
        shifts = (e - self.unit_exponent)[:, None]
        return np.left_shift(blocks, shifts, dtype=np.int64).reshape(-1)

    def decode(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        return np.ldexp(units.astype(np.float64), self.unit_exponent)


@dataclasses.dataclass(frozen=True)
class Float32Values(Stage):
    """32 bits: the float32 values themselves, converted to the sum's integer units by the server."""

    clip_norm: float
    unit_exponent: int

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        return x.astype(np.float32)

    def accept(self, values: np.ndarray, ctx: Context) -> np.ndarray:
        if not np.isfinite(values).all():
            raise ProtocolError(ErrorCode.NON_FINITE, "the update contains NaN or Inf")
        peak = float(max(values.max(initial=0.0), -values.min(initial=0.0)))
        if peak > self.clip_norm:
            raise ProtocolError(ErrorCode.VALUE_OUT_OF_RANGE, f"a value of magnitude {peak:.6g} exceeds "
                                f"clip_norm = {self.clip_norm:g}")
        wide = values.astype(np.float64)
        ctx.norm = math.sqrt(float(np.dot(wide, wide)))
        return np.rint(np.ldexp(wide, -self.unit_exponent, out=wide), out=wide).astype(np.int64)

    def decode(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        return np.ldexp(units.astype(np.float64), self.unit_exponent)


@dataclasses.dataclass(frozen=True)
class WireFormat(Stage):
    """The body of an upload: safetensors with the codes and scales (or values) and metadata."""

    bits: int
    count: int                  # values sent (the padded size when quantized)
    block: int
    fingerprint: str
    unit_exponent: int
    max_exponent: int
    indicator: bool = False     # DP: the update carries its "unclipped" bit (uint8 [1])

    @property
    def tensors(self) -> set[str]:
        return ({"values"} if self.bits == 32 else {"codes", "scales"}) | ({"unclipped"} if self.indicator else set())

    def encode(self, value, ctx: Context) -> bytes:
        if self.bits == 32:
            tensors = {"values": np.ascontiguousarray(value, np.float32)}
        else:
            q, e = value
            tensors = {"codes": pack(q, self.bits), "scales": np.ldexp(np.ones(len(e), np.float32), e)}
        if self.indicator:
            tensors["unclipped"] = np.array([ctx.unclipped], np.uint8)
        return st_save(tensors, metadata={"format": FORMAT, "bits": str(self.bits), "spec": self.fingerprint})

    def accept(self, body: bytes, ctx: Context):
        tensors, meta = _load(body)
        _check_meta(meta, self.fingerprint, self.bits)
        if set(tensors) != self.tensors:
            raise ProtocolError(ErrorCode.MALFORMED_UPDATE, f"an update holds exactly the tensors "
                                f"{sorted(self.tensors)}, got {sorted(tensors)[:5]}")
        if self.indicator:
            bit = tensors["unclipped"]
            if bit.dtype != np.uint8 or bit.shape != (1,) or bit[0] > 1:
                raise ProtocolError(ErrorCode.MALFORMED_UPDATE, "'unclipped' must be uint8 [1], 0 or 1")
            ctx.unclipped = int(bit[0])
        if self.bits == 32:
            values = tensors["values"]
            if values.dtype != np.float32:
                raise ProtocolError(ErrorCode.WRONG_WIDTH, f"'values' must be float32, not {values.dtype}")
            if values.shape != (self.count,):
                raise ProtocolError(ErrorCode.WRONG_LENGTH, f"'values' must have shape [{self.count}], not "
                                    f"{list(values.shape)}")
            return values
        q = unpack(tensors["codes"], self.bits, self.count)
        return q, self._exponents(tensors["scales"])

    def _exponents(self, scales: np.ndarray) -> np.ndarray:
        blocks = self.count // self.block
        if scales.dtype != np.float32 or scales.shape != (blocks,):
            raise ProtocolError(ErrorCode.WRONG_LENGTH, f"'scales' must be float32 [{blocks}], got "
                                f"{scales.dtype} {list(scales.shape)}")
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise ProtocolError(ErrorCode.BAD_SCALE, "every scale must be finite and > 0")
        mantissa, e = np.frexp(scales)
        e = e.astype(np.int64) - 1
        if (mantissa != 0.5).any() or e.min() < self.unit_exponent or e.max() > self.max_exponent:
            raise ProtocolError(ErrorCode.BAD_SCALE, f"every scale must be a power of two in "
                                f"[2^{self.unit_exponent}, 2^{self.max_exponent}]")
        return e


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


def _check_meta(meta: dict, fingerprint: str, bits: int) -> None:
    if meta.get("format") != FORMAT:
        raise ProtocolError(ErrorCode.MALFORMED_UPDATE, f"metadata 'format' must be {FORMAT!r}")
    if meta.get("spec") != fingerprint:
        raise ProtocolError(ErrorCode.WRONG_SPEC, "the update was encoded for another round's spec "
                            f"(its 'spec' metadata is not this round's fingerprint {fingerprint})")
    if meta.get("bits") != str(bits):
        raise ProtocolError(ErrorCode.WRONG_WIDTH, f"this round's updates have {bits} bits per "
                            f"value, not {meta.get('bits')!r}")


def _load(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the string metadata of a safetensors body (its header is JSON)."""
    try:
        tensors = st_load(body)
        (header_len,) = struct.unpack("<Q", body[:8])
        meta = json.loads(body[8:8 + header_len]).get("__metadata__") or {}
    except BaseException as e:   # safetensors' errors, and a Rust panic (a BaseException) on bad input
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ProtocolError(ErrorCode.MALFORMED_UPDATE,
                            f"the body is not a safetensors file ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise ProtocolError(ErrorCode.MALFORMED_UPDATE, "the update's metadata is not an object")
    return tensors, meta
