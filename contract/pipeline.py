"""The update pipeline: how a device encodes its model update and how the server adds it up.

Each stage holds both halves, as TFF's aggregator factories do (mean ∘ clip ∘
quantize ∘ sum): `encode` runs on the device, `accept` on the server for each
update before it joins the round's sum (decoding and checking what it can
see), and `decode` on the server once, on the sum, when the round closes. A
stage says whether it is `linear` (decoding the sum equals summing the
decoded updates), which is what lets the server add updates without looking
at each one — the property secure aggregation needs.

Device, in order (server: `accept` in reverse order, then `decode` the sum):

1. `Clipping`: the update is scaled to L2 norm <= C. Server: refuses a decoded
   update whose norm exceeds C (422 norm_exceeds_clip). The device checks its
   encoded update as the server will and shrinks it in the rare case that
   rounding pushed it over.
2. `Weighting`: weight w = min(local examples, W) (or 1 for uniform), and the
   update is scaled by w/W, so a weighted update is never larger than the clip.
   Server: refuses a weight outside [1, W]; the sum is scaled by W / Σw.
3. `Rotation` (optional): pad to blocks, randomized Hadamard rotation with the
   round's seed (contract.hadamard); the server rotates the sum back once.
4. `Quantization`: per block of B values, the smallest power-of-two scale 2^e
   with |value| <= L·2^e, then unbiased stochastic rounding to -L..L
   (L = 2^(b-1) - 1) with the session's seed. Server: each update becomes
   integers in units of 2^e_unit (e_unit = ceil(log2 C) - 40, below every
   scale a device may use), so the round's running sum is an exact int64 sum:
   no float drift, the same in any order, O(model) memory. 32 bits sends the
   float32 values themselves; they are converted to the same units.
5. `WireFormat`: a safetensors file — bit-packed codes (contract.packing) and
   the per-block scales as float32, or the float32 values — with metadata
   naming the format, the bit width and the round spec's fingerprint.

What one device can do to a round is therefore bounded: its accepted update
has norm <= C and weight <= W, so it moves the round's mean by at most
W·C / Σw, exactly as much as an honest device holding W examples can.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contract.errors import ErrorCode, ProtocolError
from contract.hadamard import padded_size, rotate, unrotate
from contract.packing import levels, pack, unpack
from contract.update_spec import RoundSpec

FORMAT = "nightjar-update-1"
UNIT_SPAN = 40                          # the running sum's unit is 2^(ceil(log2 C) - UNIT_SPAN)
ROUNDING_STREAM = 0x53524E44            # "SRND": the session seed's stream for stochastic rounding
SHRINK_ATTEMPTS = 8


@dataclasses.dataclass
class Context:
    """What flows through the stages besides the value itself."""

    num_examples: int = 1       # device: its local examples; server: the weight it claimed
    seed: int = 0               # device: the session's seed (stochastic rounding)
    weight: int = 1             # the update's weight after the cap
    weight_sum: int = 0         # server, decode: Σ weights of the round's accepted updates
    norm: float = 0.0           # server, accept: the decoded update's L2 norm


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

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        if ctx.num_examples < 1:
            raise ValueError("an update needs at least one example")
        ctx.weight = 1 if self.mode == "uniform" else min(int(ctx.num_examples), self.cap)
        return x * (ctx.weight / self.cap)

    def accept(self, value, ctx: Context):
        if not 1 <= ctx.num_examples <= self.cap:
            raise ProtocolError(ErrorCode.WEIGHT_OUT_OF_RANGE,
                                f"num_examples must be in [1, max_weight = {self.cap}]")
        ctx.weight = int(ctx.num_examples)
        return value

    def decode(self, total: np.ndarray, ctx: Context) -> np.ndarray:
        if ctx.weight_sum < 1:
            raise ValueError("no update was accepted")
        return total * (self.cap / ctx.weight_sum)


@dataclasses.dataclass(frozen=True)
class Clipping(Stage):
    clip_norm: float
    unit_exponent: int

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        norm = float(np.linalg.norm(x))
        return x * (self.clip_norm / norm) if norm > self.clip_norm else x

    def accept(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        """Refuse an update whose decoded norm (measured by the stage that decoded it) exceeds C."""
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

    @property
    def tensors(self) -> set[str]:
        return {"values"} if self.bits == 32 else {"codes", "scales"}

    def encode(self, value, ctx: Context) -> bytes:
        if self.bits == 32:
            tensors = {"values": np.ascontiguousarray(value, np.float32)}
        else:
            q, e = value
            tensors = {"codes": pack(q, self.bits), "scales": np.ldexp(np.ones(len(e), np.float32), e)}
        return st_save(tensors, metadata={"format": FORMAT, "bits": str(self.bits), "spec": self.fingerprint})

    def accept(self, body: bytes, ctx: Context):
        tensors, meta = _load(body)
        if meta.get("format") != FORMAT:
            raise ProtocolError(ErrorCode.MALFORMED_UPDATE, f"metadata 'format' must be {FORMAT!r}")
        if meta.get("spec") != self.fingerprint:
            raise ProtocolError(ErrorCode.WRONG_SPEC, "the update was encoded for another round's spec "
                                f"(its 'spec' metadata is not this round's fingerprint {self.fingerprint})")
        if meta.get("bits") != str(self.bits):
            raise ProtocolError(ErrorCode.WRONG_WIDTH, f"this round's updates have {self.bits} bits per "
                                f"value, not {meta.get('bits')!r}")
        if set(tensors) != self.tensors:
            raise ProtocolError(ErrorCode.MALFORMED_UPDATE, f"an update holds exactly the tensors "
                                f"{sorted(self.tensors)}, got {sorted(tensors)[:5]}")
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


@dataclasses.dataclass
class Encoded:
    """What a device uploads: the body, and the weight it claims (`num_examples`)."""

    body: bytes
    weight: int
    norm: float


@dataclasses.dataclass
class Contribution:
    """One accepted update as the server adds it: integers in the round's units, and its weight."""

    units: np.ndarray       # int64 [padded size]
    weight: int
    norm: float


class UpdatePipeline:
    """The stages of one round's spec, composed."""

    def __init__(self, round_spec: RoundSpec):
        self.round_spec = spec = round_spec
        s = spec.spec
        unit = math.ceil(math.log2(s.clip_norm)) - UNIT_SPAN
        self.unit_exponent = unit
        if s.bits == 32:
            top = math.ceil(math.log2(s.clip_norm))
            self.count = spec.size
            values: list[Stage] = [Float32Values(s.clip_norm, unit)]
            block = 1
        else:
            top = math.ceil(math.log2(s.clip_norm / levels(s.bits)))
            rotation = Rotation(spec.size, s.block_size, spec.rotation_seed, s.rotation)
            self.count = rotation.padded
            values = [rotation, Quantization(s.bits, s.block_size, unit, top)]
            block = s.block_size
        self.stages: list[Stage] = [Clipping(s.clip_norm, unit), Weighting(s.weighting, s.weight_cap),
                                    *values, WireFormat(s.bits, self.count, block, spec.fingerprint,
                                                        unit, top)]

    @property
    def linear(self) -> bool:
        return all(stage.linear for stage in self.stages)

    # -- the device's half --------------------------------------------------

    def encode(self, delta: np.ndarray, num_examples: int, seed: int) -> Encoded:
        """A device's upload for `delta` (trained − downloaded weights, float32 [size]).

        The device runs the server's checks on its own body; if rounding made
        the decoded norm exceed the clip, it shrinks the update and encodes
        it again (at most SHRINK_ATTEMPTS times, then it sends a zero update).
        """
        delta = np.asarray(delta, np.float64)
        if delta.shape != (self.round_spec.size,):
            raise ValueError(f"delta has shape {delta.shape}, the round's spec needs "
                             f"({self.round_spec.size},)")
        ctx = Context(num_examples=num_examples, seed=seed)
        x = self.stages[1].encode(self.stages[0].encode(delta, ctx), ctx)
        for _ in range(SHRINK_ATTEMPTS):
            body = self._encode_from(x, 2, ctx)
            check = Context(num_examples=ctx.weight)
            try:
                self._accept(body, check)
                return Encoded(body, ctx.weight, check.norm)
            except ProtocolError as e:
                if e.code is not ErrorCode.NORM_EXCEEDS_CLIP:
                    raise
                x = x * (self.round_spec.spec.clip_norm / check.norm * (1 - 1e-6))
        body = self._encode_from(np.zeros_like(x), 2, ctx)
        return Encoded(body, ctx.weight, 0.0)

    def _encode_from(self, value, start: int, ctx: Context) -> bytes:
        for stage in self.stages[start:]:
            value = stage.encode(value, ctx)
        return value

    # -- the server's half --------------------------------------------------

    def accept(self, body: bytes, num_examples: int) -> Contribution:
        """Decode and check one upload; ProtocolError (422) names what is wrong with it."""
        ctx = Context(num_examples=num_examples)
        return Contribution(self._accept(body, ctx), ctx.weight, ctx.norm)

    def _accept(self, body: bytes, ctx: Context) -> np.ndarray:
        value = body
        for stage in reversed(self.stages):
            value = stage.accept(value, ctx)
        return value

    def finalize(self, units: np.ndarray, weight_sum: int) -> np.ndarray:
        """The round's mean update (float32 [size]) from the sum of its accepted contributions."""
        ctx = Context(weight_sum=int(weight_sum))
        value = units
        for stage in reversed(self.stages[:-1]):
            value = stage.decode(value, ctx)
        return np.asarray(value, np.float32)


class IntegerSum:
    """The running sum of a round's contributions: exact int64, plus Σ weights and a count."""

    def __init__(self, count: int, total: np.ndarray | None = None, weight: int = 0, updates: int = 0):
        self.total = np.zeros(count, np.int64) if total is None else total
        self.weight = int(weight)
        self.updates = int(updates)

    def add(self, c: Contribution) -> "IntegerSum":
        self.total += c.units
        self.weight += c.weight
        self.updates += 1
        return self

    def merge(self, other: "IntegerSum") -> "IntegerSum":
        self.total += other.total
        self.weight += other.weight
        self.updates += other.updates
        return self


def aggregate(pipeline: UpdatePipeline, uploads) -> np.ndarray:
    """The mean of `(body, num_examples)` pairs as the server computes it (pure NumPy, no I/O)."""
    total = IntegerSum(pipeline.count)
    for body, num_examples in uploads:
        total.add(pipeline.accept(body, num_examples))
    return pipeline.finalize(total.total, total.weight)
