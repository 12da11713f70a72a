"""The update pipeline's stages, each with both halves (composed in contract.update.pipeline).

`encode` runs on the device, `accept` on the server for each update before
it joins the round's sum (decoding and checking what it can see), `decode`
on the server once, on the sum, when the round closes. Every stage here is
`linear` (decoding a sum equals summing the decoded updates): that is what
lets the server add updates it cannot see, under secure aggregation.

Plain rounds: Clipping → Weighting → Rotation → Quantization (or
Float32Values) → WireFormat: clip, then weight. Rounds under secure
aggregation replace the last two by contract.update.masked's stages.
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
from contract.update.packing import levels, pack, unpack

FORMAT = "nightjar-update-1"
ROUNDING_STREAM = 0x53524E44            # "SRND": the session seed's stream for stochastic rounding


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
    """The first stage: the update is scaled to L2 norm <= C before Weighting scales it by w/W.

    So a decoded update of weight w may have norm C·w/W at most, and the
    server refuses more (`bound`): a device claiming one example cannot send
    a full-norm update and count W times what its weight allows.
    """

    clip_norm: float
    unit_exponent: int
    weight_cap: int = 1         # W (Weighting's cap): the bound scales with the claimed weight w / W

    def bound(self, weight: int) -> float:
        """The largest decoded norm an update of `weight` may have: C · w / W."""
        return self.clip_norm * min(max(int(weight), 0), self.weight_cap) / self.weight_cap

    def encode(self, x: np.ndarray, ctx: Context) -> np.ndarray:
        norm = float(np.linalg.norm(x))
        ctx.unclipped = int(norm <= self.clip_norm)
        return x * (self.clip_norm / norm) if norm > self.clip_norm else x

    def accept(self, units: np.ndarray, ctx: Context) -> np.ndarray:
        """Refuse an update whose decoded norm (measured by the stage that decoded it) exceeds C·w/W
        (w: the weight Weighting accepted)."""
        if ctx.masked:          # unreadable by design: the device clipped it; the server checks the sum
            return units        # (contract.secagg.plausible)
        limit = self.bound(ctx.weight)
        if not ctx.norm <= limit:
            raise ProtocolError(ErrorCode.NORM_EXCEEDS_CLIP, f"the update's L2 norm {ctx.norm:.6g} exceeds "
                                f"clip_norm × num_examples / max_weight = {limit:.6g}")
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
