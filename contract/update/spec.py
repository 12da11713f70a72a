"""How a population's devices encode their updates, and the same settings frozen into a round.

`UpdateSpec` is what an operator configures per population (the server's
`[populations.<name>.update]` table) and what a researcher passes to
`python -m models simulate`. When a round opens, the server binds it to the
round (`UpdateSpec.bind`): the model size, the weight layout's hash, the
round it belongs to and the seed of the round's rotation. The result,
`RoundSpec`, goes to every device of the round inside its assignment, and
every encoded update names its fingerprint, so an update made for another
round, another layout or other settings is refused before it is read.

Defaults (a new population): 8-bit quantization, clipping, and a weight cap.
8 bits cut a Gboard-size upload from 5.7 MB to 1.43 MB; TFF's
`compression_aggregator` quantizes to 8 bits by default, with "no adverse
effect on model quality in typical tasks". The clip and the cap bound what
one device can do to a round (see contract.update.pipeline). The clip norm's default
and the weight cap's come from measurements on the federated corpus:
benchmarks/REPORT.md, "update pipeline".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from contract.protocol import schema as s
from contract.update.hadamard import BLOCK_SIZES
from contract.update.packing import WIDTHS
from contract.update.robust import AGGREGATORS
from contract.update.masked import WEIGHT_BITS

BITS = (32,) + tuple(sorted(WIDTHS, reverse=True))   # 32 = float32, no quantization
WEIGHTINGS = ("examples", "uniform")
DEFAULT_CLIP_NORM = 2.5      # ~ the 95th percentile of update norms in `make bench-quality`'s setting
DEFAULT_MAX_WEIGHT = 317   # per epoch: the 95th percentile of a training client's windows
DEFAULT_BLOCK_SIZE = 1024
GRID_SIGMAS = 4.0            # secure aggregation's grid spans ± this many rotated-coordinate "sigmas" at norm C
GRID_ROUNDING = 1.25         # secure aggregation: room for a grid's rounding noise, in its expected size (masked_bound)
MAX_MODULUS_BITS = 32
DP_MECHANISMS = ("central", "distributed", "ftrl")
NOISE_TAIL = 10.0            # distributed DP: the modulus leaves room for this many σ of the noise's sum
COUNT_SCALE = 1024           # distributed DP: the unclipped bit is sent as COUNT_SCALE × bit, noised   # contract.dp.noise.MECHANISMS (dp imports cryptography; this stays light)


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """The update pipeline's settings (see contract.update.pipeline for what each stage does)."""

    bits: int = 8                       # 32 (float32, as sent before quantization existed), 16, 8, 4, 2
    rotation: bool = False              # randomized Hadamard rotation before quantizing (Suresh et al.)
    clip_norm: float = DEFAULT_CLIP_NORM   # the device scales its update to L2 norm <= this
    weighting: str = "examples"         # "examples": weight = local examples, capped; "uniform": 1 each
    max_weight: int = DEFAULT_MAX_WEIGHT   # cap on an update's weight (examples), and its upper bound
    block_size: int = DEFAULT_BLOCK_SIZE   # values per quantization scale (and per Hadamard block)
    secure_aggregation: bool = False    # masked updates on one grid per round (contract.secagg.masking)
    # How the server combines the round's updates: "mean" (linear: the running sum), or a robust rule
    # that reads every update (contract.update.robust; never under secure aggregation, uniform weighting).
    aggregator: str = "mean"
    trim: float = 0.1                   # trimmed_mean: the fraction dropped at each end of a coordinate
    # > 0: the server zeroes (counts, but does not add) an update whose norm is above this many times
    # the median norm of the last training round (contract.update.robust.zeroing_norm); plain rounds only.
    zeroing: float = 0.0

    def validate(self, where: str = "update") -> "UpdateSpec":
        """This spec, or ValueError naming the setting at fault."""
        if self.bits not in BITS:
            raise ValueError(f"{where}.bits must be one of {', '.join(map(str, BITS))}")
        if self.bits == 32 and self.rotation:
            raise ValueError(f"{where}.rotation only applies to quantized updates (bits < 32)")
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm)
                and self.clip_norm > 0):
            raise ValueError(f"{where}.clip_norm must be a finite number > 0")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"{where}.weighting must be one of {', '.join(WEIGHTINGS)}")
        if not isinstance(self.max_weight, int) or not 1 <= self.max_weight <= 2**31:
            raise ValueError(f"{where}.max_weight must be an integer in [1, 2^31]")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"{where}.block_size must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"{where}.aggregator must be one of {', '.join(AGGREGATORS)}")
        if not (isinstance(self.trim, (int, float)) and 0 <= self.trim < 0.5):
            raise ValueError(f"{where}.trim must be in [0, 0.5)")
        if not (isinstance(self.zeroing, (int, float)) and math.isfinite(self.zeroing) and self.zeroing >= 0):
            raise ValueError(f"{where}.zeroing must be a finite number >= 0 (0: off)")
        if self.zeroing and self.secure_aggregation:
            raise ValueError(f"{where}.zeroing reads every update's norm, and secure aggregation shows the "
                             "server only their sum: turn one of them off")
        if self.aggregator != "mean" and self.secure_aggregation:
            raise ValueError(f"{where}.aggregator = {self.aggregator!r} reads every update, and secure "
                             "aggregation shows the server only their sum: use 'mean' with it, or turn it off")
        if self.aggregator != "mean" and self.weighting != "uniform":
            raise ValueError(f"{where}.aggregator = {self.aggregator!r} weighs every update the same: "
                             "set weighting = 'uniform'")
        if self.secure_aggregation and (self.bits == 32 or not self.rotation):
            raise ValueError(f"{where}: secure aggregation masks integers on one grid per round, which "
                             "needs quantized updates (bits < 32) with the rotation on")
        return self

    def scaled_to_epochs(self, epochs: int) -> "UpdateSpec":
        """The default cap counts one epoch's examples; a task of several epochs reports more."""
        return dataclasses.replace(self, max_weight=self.max_weight * max(1, int(epochs)))

    @property
    def weight_cap(self) -> int:
        """W: the largest weight an update may carry (1 when every device weighs the same: a bound
        round's max_weight says so, `bind`)."""
        return 1 if self.weighting == "uniform" else self.max_weight

    def bind(self, size: int, layout_sha256: str, round_key: str, seed: int,
             cohort_max: int = 0, dp: tuple | None = None, zeroing_norm: float = 0.0) -> "RoundSpec":
        """The spec of one round; `cohort_max` (the most devices it selects) sizes secure
        aggregation's modulus; `dp` = (mechanism, noise stddev on the sum, denominator[, σ_b]);
        `zeroing_norm`: the norm above which this round zeroes an update (0: none)."""
        mechanism, stddev, denominator, count_stddev = (tuple(dp) + (0.0,))[:4] if dp else ("", 0.0, 0, 0.0)
        spec = dataclasses.replace(self.validate(), max_weight=self.weight_cap)   # uniform: W = 1, said so
        bound = RoundSpec(spec, size, layout_sha256, round_key, seed,
                          cohort_max if self.secure_aggregation else 0, mechanism, float(stddev),
                          int(denominator), float(count_stddev), float(zeroing_norm))
        bound.validate()
        return bound


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """An `UpdateSpec` bound to one round of one population (what an assignment carries)."""

    spec: UpdateSpec
    size: int               # values in the flat weight vector (contract.model.weights.WeightLayout.size)
    layout_sha256: str      # the layout they are in (contract.model.weights.WeightLayout.sha256)
    round_key: str          # "<population>/<round number>"
    rotation_seed: int      # the round's rotation (every device of the round uses the same)
    cohort_max: int = 0     # secure aggregation: the most updates the round can sum (else 0)
    # User-level DP (contract.dp.noise), bound by the server when the round opens; clip_norm is then the
    # round's adaptive clip. "" = no DP; "central": the server adds N(0, dp_stddev²) to the sum; "ftrl": the
    # server adds the round's share of DP-FTRL's correlated noise (contract.dp.ftrl), of that stddev per node.
    dp_mechanism: str = ""
    dp_stddev: float = 0.0  # the noise's standard deviation on the sum of clipped updates (z_v · C)
    dp_denominator: int = 0  # the fixed denominator of the mean: the round's expected reports
    dp_count_stddev: float = 0.0   # σ_b: the noise on Σ(unclipped − 1/2), the adaptive clip's share
    zeroing_norm: float = 0.0      # spec.zeroing: updates of a larger norm are zeroed (0: none this round)

    def validate(self) -> "RoundSpec":
        if not (math.isfinite(self.zeroing_norm) and self.zeroing_norm >= 0):
            raise ValueError("zeroing_norm must be a finite number >= 0")
        if self.dp_mechanism:
            if self.dp_mechanism not in DP_MECHANISMS:
                raise ValueError(f"dp_mechanism must be one of {', '.join(DP_MECHANISMS)} (or empty)")
            if self.spec.weighting != "uniform":
                raise ValueError("DP rounds take an unweighted mean: weighting must be 'uniform'")
            if self.dp_denominator < 1 or not all(math.isfinite(x) and x >= 0 for x in (
                    self.dp_stddev, self.dp_count_stddev)):
                raise ValueError("a DP round needs dp_denominator >= 1 and finite noise stddevs >= 0")
            if self.spec.aggregator != "mean":
                raise ValueError("DP's accounting is for the clipped mean: a robust aggregator cannot be used with it")
            if self.spec.zeroing:
                raise ValueError("DP's accounting does not cover zeroing by a threshold drawn from other devices' "
                                 "norms (and DP's adaptive clip already bounds every update): turn zeroing off")
            if self.dp_mechanism == "distributed" and not self.spec.secure_aggregation:
                raise ValueError("distributed DP adds its noise on the devices, under secure aggregation")
        if self.spec.secure_aggregation:
            if self.cohort_max < 1:
                raise ValueError("a round under secure aggregation needs cohort_max >= 1")
            if self.cohort_max * self.spec.weight_cap >= 2**WEIGHT_BITS:
                raise ValueError(f"the weights of {self.cohort_max} updates of up to {self.spec.weight_cap} are "
                                 f"summed modulo 2^{WEIGHT_BITS}: cohort_max × max_weight must stay below it")
            if self.modulus_bits > MAX_MODULUS_BITS:
                raise ValueError(f"{self.cohort_max} updates of {self.spec.bits} bits need a "
                                 f"{self.modulus_bits}-bit modulus; at most {MAX_MODULUS_BITS} are supported "
                                 "(fewer bits per value, or a smaller goal)")
        return self

    @property
    def padded(self) -> int:
        """Values per quantized update (the size padded to whole blocks)."""
        from contract.update.hadamard import padded_size

        return padded_size(self.size, self.spec.block_size)

    @property
    def modulus_bits(self) -> int:
        """m: the codes of cohort_max devices (each in -L..L) sum within ±2^(m-1), so the centered sum
        never wraps; under distributed DP with room for NOISE_TAIL standard deviations of their noise."""
        levels = 2 ** (self.spec.bits - 1) - 1
        span = self.cohort_max * levels
        if self.dp_mechanism == "distributed":
            span += NOISE_TAIL * self.device_noise_units * math.sqrt(self.cohort_max)
        return max(1, math.ceil(math.log2(2 * span + 1)))

    @property
    def device_noise_units(self) -> float:
        """Distributed DP: each device's discrete Gaussian σ on its codes, in grid steps (the sum of
        dp_denominator of them has standard deviation dp_stddev in model units)."""
        if self.dp_mechanism != "distributed":
            return 0.0
        return self.dp_stddev / self.grid_step / math.sqrt(self.dp_denominator)

    @property
    def device_count_noise_units(self) -> float:
        """Distributed DP: each device's discrete Gaussian σ on its unclipped bit, in COUNT_SCALE units."""
        if self.dp_mechanism != "distributed":
            return 0.0
        return COUNT_SCALE * self.dp_count_stddev / math.sqrt(self.dp_denominator)

    def masked_bound(self, weight: int) -> float:
        """Secure aggregation: the largest norm a device's grid codes may decode to, for its weight w:
        min(C, C·w/W + R·sqrt(w/W)), R = GRID_ROUNDING · C · sqrt(GRID_SIGMAS / L).

        The device checks it (shrinking its update until it holds), and the server's check of the
        sum (contract.secagg.plausible) relies on it. Why not C·w/W as in a plain round: the grid
        is the round's, so an update of small weight is small next to its step, and rounding adds
        to its squared norm up to step·||y||₁ <= (GRID_SIGMAS·C/L)·||y|| in expectation; R·sqrt(w/W)
        leaves room for that. Why not C alone: the server could then not tell a sum whose Σw was
        lowered by one modified device from an honest one (contract.secagg.plausible.largest_step).
        """
        s = self.spec
        share = min(max(int(weight), 0), s.weight_cap) / s.weight_cap
        return min(s.clip_norm, s.clip_norm * share + self.grid_rounding * math.sqrt(share))

    @property
    def grid_rounding(self) -> float:
        """R of `masked_bound`: GRID_ROUNDING · C · sqrt(GRID_SIGMAS / L)."""
        return GRID_ROUNDING * self.spec.clip_norm * math.sqrt(GRID_SIGMAS / (2 ** (self.spec.bits - 1) - 1))

    @property
    def grid_step(self) -> float:
        """Secure aggregation's one grid: GRID_SIGMAS × C / sqrt(padded) spread over the L levels."""
        levels = 2 ** (self.spec.bits - 1) - 1
        return GRID_SIGMAS * self.spec.clip_norm / math.sqrt(self.padded) / levels

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything above: what an encoded update must name."""
        return hashlib.sha256(json.dumps(self.to_json(fingerprint=False), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    def to_json(self, fingerprint: bool = True) -> dict:
        """The spec as an assignment carries it. Each number has its field's JSON type (an integer
        field an integer, a number field a float: `clip_norm = 5` in a config is 5.0 here), so the
        fingerprint a device recomputes from the parsed fields is the server's."""
        s = self.spec
        out = {**dataclasses.asdict(s), "bits": int(s.bits), "clip_norm": float(s.clip_norm),
               "max_weight": int(s.max_weight), "block_size": int(s.block_size), "trim": float(s.trim),
               "zeroing": float(s.zeroing), "size": int(self.size), "layout_sha256": self.layout_sha256,
               "round_key": self.round_key, "rotation_seed": int(self.rotation_seed),
               "cohort_max": int(self.cohort_max)}
        if self.spec.aggregator == "mean":   # the default says nothing: fingerprints of mean rounds unchanged
            del out["aggregator"], out["trim"]
        if not self.spec.zeroing:           # likewise without zeroing
            del out["zeroing"]
        else:
            out["zeroing_norm"] = float(self.zeroing_norm)
        if self.dp_mechanism:       # absent without DP: fingerprints of non-DP rounds are unchanged
            out.update(dp_mechanism=self.dp_mechanism, dp_stddev=float(self.dp_stddev),
                       dp_denominator=int(self.dp_denominator), dp_count_stddev=float(self.dp_count_stddev))
        if fingerprint:
            out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_json(cls, value: object, where: str = "update") -> "RoundSpec":
        """Parse (and check) a round's spec as an assignment carries it; ProtocolError if bad."""
        from contract.protocol.errors import ErrorCode, ProtocolError

        fields = ROUND_SPEC.parse(value, where)
        spec = UpdateSpec(**{f.name: fields[f.name] for f in dataclasses.fields(UpdateSpec)})
        try:
            spec.validate(where)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, str(e)) from None
        bound = cls(spec, fields["size"], fields["layout_sha256"], fields["round_key"],
                    fields["rotation_seed"], fields["cohort_max"], fields["dp_mechanism"],
                    float(fields["dp_stddev"]), fields["dp_denominator"], float(fields["dp_count_stddev"]),
                    float(fields["zeroing_norm"]))
        try:
            bound.validate()
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{where}: {e}") from None
        if fields.get("fingerprint") not in (None, bound.fingerprint):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{where}.fingerprint does not match its fields")
        return bound


def rotation_seed(seed: int, round_number: int) -> int:
    """The seed of a round's rotation, from the population's (or the simulation's) seed."""
    import numpy as np

    return int(np.random.SeedSequence([seed, round_number, 0x524F54]).generate_state(1, np.uint64)[0]) >> 1


SHA256 = s.Str(64, "[0-9a-f]{64}")
ROUND_SPEC = s.Obj("UpdateSpec", [
    s.Field("bits", s.Enum(BITS, description=(
        "bits per value: 32 = float32 values; 16, 8, 4, 2 = stochastic quantization to the "
        "integers -L..L, L = 2^(bits-1) - 1, one power-of-two scale per block"))),
    s.Field("rotation", s.Bool("randomized Hadamard rotation (seeded by rotation_seed) before quantizing")),
    s.Field("clip_norm", s.Num(0, None, (
        "C. The device clips its update to L2 norm <= C, then scales it by weight / max_weight (clip, then "
        "weight); the server refuses (422 norm_exceeds_clip) an update whose decoded norm — as the server "
        "decodes it from the codes and scales — exceeds C × num_examples / max_weight. Quantization's "
        "rounding adds to the norm (at 4 bits, a few per cent): the device measures its encoded update "
        "the same way and, if it is over, scales the update down by bound / norm (less a small margin) "
        "and encodes it again. Under secure aggregation the device checks its grid codes' norm "
        "(sqrt(Σ code²) × the grid's step) against min(C, C·w/W + R·sqrt(w/W)), R = 1.25·C·sqrt(4/L) "
        "(contract.update.spec.RoundSpec.masked_bound); the server checks only the unmasked sum"))),
    s.Field("weighting", s.Enum(WEIGHTINGS, "examples: weight = local examples, capped at max_weight; "
                                            "uniform: every update weighs 1, and max_weight is 1")),
    s.Field("max_weight", s.Int(1, 2**31, "W: the largest weight an update may carry; num_examples (the "
                                          "weight, after the cap) must be in [1, W] (1 under uniform weighting)")),
    s.Field("block_size", s.Int(256, 65536, "values per quantization scale / Hadamard block")),
    s.Field("secure_aggregation", s.Bool(
        "masked updates (contract.secagg.masking): one grid per round, step = 4·clip_norm/(L·sqrt(padded size)), "
        "codes + L summed modulo 2^m, m = ceil(log2(cohort_max·2L + 1)), the weight modulo 2^32; the server "
        "refuses an unmasked sum no honest devices could send (contract.secagg.plausible)"), required=False,
            default=False),
    s.Field("aggregator", s.Enum(AGGREGATORS, "mean: the running sum; trimmed_mean, median: robust rules "
                                              "over every update in the clear (contract.update.robust)"),
            required=False, default="mean"),
    s.Field("trim", s.Num(0, 0.5, "trimmed_mean: the fraction dropped at each end of a coordinate"),
            required=False, default=0.1),
    s.Field("zeroing", s.Num(0, None, "> 0: updates whose norm is above zeroing × the last training round's "
                                      "median norm are counted but not added (plain rounds)"),
            required=False, default=0.0),
    s.Field("zeroing_norm", s.Num(0, None, "the norm above which this round zeroes an update (0: none)"),
            required=False, default=0.0),
    s.Field("size", s.Int(1, 2**31, "N: values in the flat weight vector")),
    s.Field("layout_sha256", SHA256),
    s.Field("round_key", s.Str(200, description="the round this spec is bound to")),
    s.Field("rotation_seed", s.Int(0, 2**63)),
    s.Field("cohort_max", s.Int(0, 2**31, "secure aggregation: the most updates a round sums (else 0)"),
            required=False, default=0),
    s.Field("dp_mechanism", s.Enum(("",) + DP_MECHANISMS, "user-level DP (contract.dp.noise): '' none; central: "
                                   "the server adds Gaussian noise to the sum; distributed: each device adds "
                                   "its share of discrete Gaussian noise before masking; ftrl: the server adds "
                                   "DP-FTRL's tree-correlated Gaussian noise (contract.dp.ftrl) to the sum"),
            required=False, default=""),
    s.Field("dp_stddev", s.Num(0, None, "the noise's standard deviation on the sum of clipped updates"),
            required=False, default=0.0),
    s.Field("dp_denominator", s.Int(0, 2**31, "DP: the mean's fixed denominator (the expected reports)"),
            required=False, default=0),
    s.Field("dp_count_stddev", s.Num(0, None, "DP: the noise's standard deviation on the count of unclipped "
                                     "updates (the adaptive clip's share)"), required=False, default=0.0),
    s.Field("fingerprint", SHA256, required=False),
], description="How this round's updates are encoded (contract.update.pipeline); an update names its fingerprint.")
