"""The update pipeline: how a device encodes its model update and how the server adds it up.

Each stage (contract.update.stages) holds both halves, as TFF's aggregator factories do (mean ∘ clip ∘
quantize ∘ sum): `encode` runs on the device, `accept` on the server for each
update before it joins the round's sum (decoding and checking what it can
see), and `decode` on the server once, on the sum, when the round closes. A
stage says whether it is `linear` (decoding the sum equals summing the
decoded updates), which is what lets the server add updates without looking
at each one — the property secure aggregation needs.

Device, in order — clip, then weight (server: `accept` in reverse order, then
`decode` the sum):

1. `Clipping`: the update is scaled to L2 norm <= C.
2. `Weighting`: weight w = min(local examples, W) (or 1 for uniform, where
   W = max_weight = 1), and the update is scaled by w/W, so its norm is at
   most C·w/W. Server: refuses a weight outside [1, W], and a decoded update
   whose norm exceeds C·w/W (422 norm_exceeds_clip: a device claiming one
   example cannot send a full-norm update); the sum is scaled by W / Σw.
   The bound is on the *decoded* update, which quantization's rounding
   makes a little larger than what was clipped: the device checks its
   encoded update as the server will and shrinks it until it is within
   (`UpdatePipeline.encode`).
3. `Rotation` (optional): pad to blocks, randomized Hadamard rotation with the
   round's seed (contract.update.hadamard); the server rotates the sum back once.
4. `Quantization`: per block of B values, the smallest power-of-two scale 2^e
   with |value| <= L·2^e, then unbiased stochastic rounding to -L..L
   (L = 2^(b-1) - 1) with the session's seed. Server: each update becomes
   integers in units of 2^e_unit (e_unit = ceil(log2 C) - 40, below every
   scale a device may use), so the round's running sum is an exact int64 sum:
   no float drift, the same in any order, O(model) memory. 32 bits sends the
   float32 values themselves; they are converted to the same units.
5. `WireFormat`: a safetensors file — bit-packed codes (contract.update.packing) and
   the per-block scales as float32, or the float32 values — with metadata
   naming the format, the bit width and the round spec's fingerprint.

What one device can do to a round is therefore bounded: its accepted update
has norm <= C·w/W for its weight w <= W, so it moves the round's mean by at
most C·w / Σw, exactly as much as an honest device holding w examples can.

Under secure aggregation (`secure_aggregation` in the spec) the stages are
Clipping → Weighting → Rotation → GridQuantization → RingEncoding →
MaskedWireFormat (contract.update.masked): the server sees only masked integers,
adds them modulo 2^m, and decodes the unmasked sum once
(`finalize_masked`). No single update's norm or weight is visible: the
device checks its own (its grid codes' norm against RoundSpec.masked_bound,
C·w/W plus room for the grid's rounding), and the server
checks that the unmasked sum is one honest devices could have produced
(contract.secagg.plausible, which also bounds what one modified device can
still do; see the threat model in server/README.md).

Under user-level DP (the round spec's `dp_mechanism`, contract.dp.noise) the clip is
the round's adaptive clip, the weighting uniform and the mean's denominator
fixed (the expected reports); the "unclipped" bit joins the summed vector as
one more slot; and the noise is one more stage: `CentralNoise` after
Weighting (the server adds it to the sum when decoding) or, under secure
aggregation, `DistributedNoise` after the grid (each device adds its
discrete Gaussian share after its norm check, before masking).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from contract.dp.noise import CentralNoise, DistributedNoise
from contract.secagg.plausible import check_update_sum
from contract.update.robust import RobustAggregation
from contract.protocol.errors import ErrorCode, ProtocolError
from contract.update.packing import levels
from contract.update.masked import GridQuantization, MaskedWireFormat, RingEncoding
from contract.update.stages import (FORMAT, Clipping, Context, Float32Values, Quantization,   # noqa: F401
                                    Rotation, Stage, WireFormat, Weighting)
from contract.update.spec import RoundSpec

UNIT_SPAN = 40                          # the running sum's unit is 2^(ceil(log2 C) - UNIT_SPAN)
SHRINK_ATTEMPTS = 10
SHRINK_MARGIN = 1e-6                    # the first retry aims this far below the bound; then 10x, 100x, ...


def _shrink(bound: float, norm: float, attempt: int) -> float:
    """The factor that takes an encoded update of decoded `norm` below `bound` on retry `attempt`
    (0, 1, ...): bound / norm, less a margin for the next rounding's own inflation (float32's is an
    ulp, 4 bits' a few per cent: the margin grows until it covers it)."""
    return bound / norm * (1 - min(SHRINK_MARGIN * 10 ** attempt, 0.5))


@dataclasses.dataclass
class Encoded:
    """What a device uploads: the body, and the weight it claims (`num_examples`)."""

    body: bytes
    weight: int
    norm: float


@dataclasses.dataclass
class Contribution:
    """One accepted update as the server adds it: integers in the round's units, and its weight."""

    units: np.ndarray       # int64 [padded size] (+ the masked weight under secure aggregation; + the
                            # "unclipped" bit under DP, which the sum adds up like any other slot)
    weight: int             # 0 under secure aggregation: it is inside `units`
    norm: float
    zeroed: bool = False    # its norm is above the round's zeroing_norm: counted, not added


class UpdatePipeline:
    """The stages of one round's spec, composed."""

    def __init__(self, round_spec: RoundSpec):
        self.round_spec = spec = round_spec
        s = spec.spec
        unit = math.ceil(math.log2(s.clip_norm)) - UNIT_SPAN
        self.unit_exponent = unit
        self.secure = s.secure_aggregation
        self.dp = bool(spec.dp_mechanism)
        self.ring: RingEncoding | None = None
        self.clipping = Clipping(s.clip_norm, unit, s.weight_cap)
        front: list[Stage] = [self.clipping, Weighting(s.weighting, s.weight_cap, spec.dp_denominator)]
        if spec.dp_mechanism in ("central", "ftrl"):       # ftrl: the decoder's `random` is the tree's
            front.append(CentralNoise(spec.dp_stddev))
        self._body_from = len(front)         # the stages after these run again when a device shrinks
        self.rotation = Rotation(spec.size, s.block_size, spec.rotation_seed, s.rotation or self.secure)
        if self.secure:
            self.count = self.rotation.padded
            self.grid = GridQuantization(s.bits, spec.grid_step)
            self.ring = RingEncoding(s.bits, self.count, spec.modulus_bits, self.dp)
            noise = ([DistributedNoise(spec.device_noise_units, spec.device_count_noise_units)]
                     if spec.dp_mechanism == "distributed" else [])
            self.stages: list[Stage] = [*front, self.rotation, self.grid, *noise, self.ring, MaskedWireFormat(
                s.bits, self.count, spec.modulus_bits, spec.fingerprint, self.ring.tail)]
        elif s.bits == 32:
            self.count = spec.size
            top = math.ceil(math.log2(s.clip_norm))
            self.stages = [*front, Float32Values(s.clip_norm, unit),
                           WireFormat(32, self.count, 1, spec.fingerprint, unit, top, self.dp)]
        else:
            top = math.ceil(math.log2(s.clip_norm / levels(s.bits)))
            self.count = self.rotation.padded
            self.stages = [*front, self.rotation, Quantization(s.bits, s.block_size, unit, top),
                           WireFormat(s.bits, self.count, s.block_size, spec.fingerprint, unit, top, self.dp)]
        if s.aggregator != "mean":
            self.stages.insert(0, RobustAggregation(s.aggregator, s.trim))
        if self.secure and not self.linear:
            raise ValueError("secure aggregation adds updates the server cannot see: every stage "
                             "must be linear")

    @property
    def linear(self) -> bool:
        return all(stage.linear for stage in self.stages)

    @property
    def vector_size(self) -> int:
        """Integers in one contribution and in the running sum (the masked weight and the DP bit included)."""
        return self.count + int(self.secure) + int(self.dp)

    # -- the device's half --------------------------------------------------

    def encode(self, delta: np.ndarray, num_examples: int, seed: int,
               masker: Callable[[np.ndarray], np.ndarray] | None = None) -> Encoded:
        """A device's upload for `delta` (trained − downloaded weights, float32 [size]).

        The bound is on the *decoded* update, as the server measures it, and
        stochastic rounding adds to an update's norm (at 4 bits a clipped
        update decodes a few per cent above the clip). So the device checks its
        encoded update as the server will and, if it is over, shrinks it by
        bound / norm and a margin that grows tenfold from SHRINK_MARGIN on
        each try, and encodes it again (at most SHRINK_ATTEMPTS times, then
        it sends a zero update). Under secure aggregation, `masker` (the
        session's contract.secagg.masking.DeviceSecAgg.mask) adds the masks, and the
        check runs on the plaintext integers: the server cannot run it.
        """
        delta = np.asarray(delta, np.float64)
        if delta.shape != (self.round_spec.size,):
            raise ValueError(f"delta has shape {delta.shape}, the round's spec needs "
                             f"({self.round_spec.size},)")
        ctx = Context(num_examples=num_examples, seed=seed, masker=masker)
        x = delta
        for stage in self.stages[:self._body_from]:
            x = stage.encode(x, ctx)
        if self.secure:
            return self._encode_masked(x, ctx)
        for attempt in range(SHRINK_ATTEMPTS):
            body = self._encode_from(x, self._body_from, ctx)
            check = Context(num_examples=ctx.weight)
            try:
                self._accept(body, check)
                return Encoded(body, ctx.weight, check.norm)
            except ProtocolError as e:
                if e.code is not ErrorCode.NORM_EXCEEDS_CLIP:
                    raise
                x = x * _shrink(self.clipping.bound(ctx.weight), check.norm, attempt)
        body = self._encode_from(np.zeros_like(x), self._body_from, ctx)
        return Encoded(body, ctx.weight, 0.0)

    def _encode_masked(self, x: np.ndarray, ctx: Context) -> Encoded:
        """The grid's codes, checked against RoundSpec.masked_bound for the update's weight (not
        C·w/W: on the round's one grid, rounding adds more to a small update than that allows).
        The server relies on it when it checks the sum (contract.secagg.plausible)."""
        rotation, grid = self.rotation, self.grid
        bound = self.round_spec.masked_bound(ctx.weight)
        q, norm = None, 0.0
        for attempt in range(SHRINK_ATTEMPTS):
            q = grid.encode(rotation.encode(x, ctx), ctx)
            norm = grid.norm(q)
            if norm <= bound:
                break
            x = x * _shrink(bound, norm, attempt)
        else:
            q, norm = np.zeros(self.count, np.int32), 0.0
        after_grid = self.stages.index(self.grid) + 1       # distributed DP's noise comes after the norm check
        return Encoded(self._encode_from(q, after_grid, ctx), ctx.weight, norm)

    def plaintext(self, delta: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
        """Under secure aggregation: the integers a device masks (codes + L, then the weight), as
        uint32 — what the server must never see, and what the unmasked sum adds up."""
        seen: list[np.ndarray] = []
        self.encode(delta, num_examples, seed, masker=lambda ring: seen.append(ring.copy()) or ring)
        return seen[0]

    def _encode_from(self, value, start: int, ctx: Context) -> bytes:
        for stage in self.stages[start:]:
            value = stage.encode(value, ctx)
        return value

    # -- the server's half --------------------------------------------------

    def accept(self, body: bytes, num_examples: int | None) -> Contribution:
        """Decode and check one upload; ProtocolError (422) names what is wrong with it."""
        ctx = Context(num_examples=num_examples or 0)
        units = self._accept(body, ctx)
        if self.dp and not ctx.masked:      # the bit joins the sum as one more slot (masked: it is inside)
            units = np.append(units, np.int64(ctx.unclipped))
        limit = self.round_spec.zeroing_norm
        return Contribution(units, ctx.weight if not ctx.masked else 0, ctx.norm,
                            zeroed=bool(limit) and not ctx.masked and ctx.norm > limit)

    def _accept(self, body: bytes, ctx: Context) -> np.ndarray:
        value = body
        for stage in reversed(self.stages):
            value = stage.accept(value, ctx)
        return value

    def fold(self, total: np.ndarray, units: np.ndarray) -> np.ndarray:
        """`total` += `units` in place, modulo the ring under secure aggregation; under a robust
        aggregator (not linear) `units` is appended instead: the "sum" is the stack of updates."""
        if not self.linear:
            return np.concatenate([total, units])
        np.add(total, units, out=total)
        return self.ring.reduce(total) if self.ring is not None else total

    def stored_size(self, updates: int) -> int:
        """Integers in a running sum of `updates` contributions (a stack of them when not linear)."""
        return self.vector_size * (1 if self.linear else int(updates))

    def finalize(self, units: np.ndarray, weight_sum: int, random=None) -> np.ndarray:
        """The round's mean update (float32 [size]) from the sum of its accepted contributions.

        Under DP the mean divides by the round's fixed denominator and the
        server's Gaussian noise is added first (drawn from `random`, a
        contract.dp.noise.SecureRandom; a fresh one by default)."""
        return self.finalize_with_count(units, weight_sum, random)[0]

    def finalize_with_count(self, units: np.ndarray, weight_sum: int, random=None) -> tuple[np.ndarray, int]:
        """`finalize`, and how many of the summed updates were unclipped (DP's adaptive clip; else 0)."""
        if self.secure:
            raise ValueError("a round under secure aggregation is finalized from its unmasked sum")
        ctx = Context(weight_sum=int(weight_sum), random=random)
        if not self.linear:
            return self._robust(units), 0
        if self.dp:
            units, ctx.unclipped_sum = units[:self.count], int(units[self.count])
        return self._decode(units, ctx, len(self.stages) - 1), ctx.unclipped_sum

    def finalize_masked(self, ring_sum: np.ndarray, survivors: int, random=None) -> np.ndarray:
        """The mean update from the unmasked modular sum of `survivors` updates (secure aggregation)."""
        return self.finalize_masked_with_count(ring_sum, survivors, random)[0]

    def finalize_masked_with_count(self, ring_sum: np.ndarray, survivors: int,
                                   random=None) -> tuple[np.ndarray, int]:
        """`finalize_masked`, and the unclipped count from its masked slot (DP; else 0).
        contract.secagg.plausible.ImplausibleSum (a ValueError) if no `survivors` honest phones
        could have sent that sum: nothing is decoded from it."""
        check_update_sum(self.round_spec, ring_sum, survivors)
        ctx = Context(survivors=int(survivors), random=random)
        return self._decode(ring_sum, ctx, len(self.stages) - 1), ctx.unclipped_sum

    def _robust(self, stack: np.ndarray) -> np.ndarray:
        """A robust aggregate of the stacked updates: each decoded alone (weight 1), then combined."""
        rows = stack.reshape(-1, self.vector_size)
        if len(rows) == 0:
            raise ValueError("no update was accepted")
        decoded = np.stack([self._decode(row, Context(weight_sum=1), len(self.stages) - 1) for row in rows])
        return self.stages[0].combine(decoded)

    def _decode(self, value: np.ndarray, ctx: Context, stop: int) -> np.ndarray:
        for stage in reversed(self.stages[:stop]):
            value = stage.decode(value, ctx)
        return np.asarray(value, np.float32)


class IntegerSum:
    """The running sum of a round's contributions: exact int64 (modular under secure aggregation),
    plus Σ weights and a count."""

    def __init__(self, count: int, total: np.ndarray | None = None, weight: int = 0, updates: int = 0,
                 reduce: Callable[[np.ndarray], np.ndarray] | None = None, stack: bool = False):
        self.total = np.zeros(count, np.int64) if total is None else total
        self.weight = int(weight)
        self.updates = int(updates)
        self._reduce = reduce or (lambda total: total)
        self._stack = stack                  # a robust aggregator's "sum": the updates, one after another

    def _fold(self, units: np.ndarray) -> np.ndarray:
        if self._stack:
            return np.concatenate([self.total, units])
        return self._reduce(np.add(self.total, units, out=self.total))

    def add(self, c: Contribution) -> "IntegerSum":
        self.total = self._fold(c.units)
        self.weight += c.weight
        self.updates += 1
        return self

    def merge(self, other: "IntegerSum") -> "IntegerSum":
        self.total = self._fold(other.total)
        self.weight += other.weight
        self.updates += other.updates
        return self


def running_sum(pipeline: UpdatePipeline) -> IntegerSum:
    """An empty running sum for `pipeline`'s round (a stack of updates under a robust aggregator)."""
    if not pipeline.linear:
        return IntegerSum(0, np.zeros(0, np.int64), reduce=None, stack=True)
    return IntegerSum(pipeline.vector_size, reduce=pipeline.ring.reduce if pipeline.ring else None)


def aggregate(pipeline: UpdatePipeline, uploads) -> np.ndarray:
    """The mean of `(body, num_examples)` pairs as the server computes it (pure NumPy, no I/O)."""
    total = running_sum(pipeline)
    for body, num_examples in uploads:
        total.add(pipeline.accept(body, num_examples))
    return pipeline.finalize(total.total, total.weight)
