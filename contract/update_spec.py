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
one device can do to a round (see contract.pipeline). The clip norm's default
and the weight cap's come from measurements on the federated corpus:
benchmarks/REPORT.md, "update pipeline".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from contract import schema as s
from contract.hadamard import BLOCK_SIZES
from contract.packing import WIDTHS

BITS = (32,) + tuple(sorted(WIDTHS, reverse=True))   # 32 = float32, no quantization
WEIGHTINGS = ("examples", "uniform")
DEFAULT_CLIP_NORM = 2.5      # ~ the 95th percentile of update norms in `make bench-quality`'s setting
DEFAULT_MAX_WEIGHT = 317   # per epoch: the 95th percentile of a training client's windows
DEFAULT_BLOCK_SIZE = 1024
GRID_SIGMAS = 4.0            # secure aggregation's grid spans ± this many rotated-coordinate "sigmas" at norm C
MAX_MODULUS_BITS = 32


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """The update pipeline's settings (see contract.pipeline for what each stage does)."""

    bits: int = 8                       # 32 (float32, as sent before quantization existed), 16, 8, 4, 2
    rotation: bool = False              # randomized Hadamard rotation before quantizing (Suresh et al.)
    clip_norm: float = DEFAULT_CLIP_NORM   # the device scales its update to L2 norm <= this
    weighting: str = "examples"         # "examples": weight = local examples, capped; "uniform": 1 each
    max_weight: int = DEFAULT_MAX_WEIGHT   # cap on an update's weight (examples), and its upper bound
    block_size: int = DEFAULT_BLOCK_SIZE   # values per quantization scale (and per Hadamard block)
    secure_aggregation: bool = False    # masked updates on one grid per round (contract.secagg)

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
        if self.secure_aggregation and (self.bits == 32 or not self.rotation):
            raise ValueError(f"{where}: secure aggregation masks integers on one grid per round, which "
                             "needs quantized updates (bits < 32) with the rotation on")
        return self

    def scaled_to_epochs(self, epochs: int) -> "UpdateSpec":
        """The default cap counts one epoch's examples; a task of several epochs reports more."""
        return dataclasses.replace(self, max_weight=self.max_weight * max(1, int(epochs)))

    @property
    def weight_cap(self) -> int:
        """W: the largest weight an update may carry (1 when every device weighs the same)."""
        return 1 if self.weighting == "uniform" else self.max_weight

    def bind(self, size: int, layout_sha256: str, round_key: str, seed: int,
             cohort_max: int = 0) -> "RoundSpec":
        """The spec of one round; `cohort_max` (the most devices it selects) sizes secure
        aggregation's modulus."""
        bound = RoundSpec(self.validate(), size, layout_sha256, round_key, seed,
                          cohort_max if self.secure_aggregation else 0)
        bound.validate()
        return bound


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """An `UpdateSpec` bound to one round of one population (what an assignment carries)."""

    spec: UpdateSpec
    size: int               # values in the flat weight vector (contract.weights.WeightLayout.size)
    layout_sha256: str      # the layout they are in (contract.weights.WeightLayout.sha256)
    round_key: str          # "<population>/<round number>"
    rotation_seed: int      # the round's rotation (every device of the round uses the same)
    cohort_max: int = 0     # secure aggregation: the most updates the round can sum (else 0)

    def validate(self) -> "RoundSpec":
        if self.spec.secure_aggregation:
            if self.cohort_max < 1:
                raise ValueError("a round under secure aggregation needs cohort_max >= 1")
            if self.modulus_bits > MAX_MODULUS_BITS:
                raise ValueError(f"{self.cohort_max} updates of {self.spec.bits} bits need a "
                                 f"{self.modulus_bits}-bit modulus; at most {MAX_MODULUS_BITS} are supported "
                                 "(fewer bits per value, or a smaller goal)")
        return self

    @property
    def padded(self) -> int:
        """Values per quantized update (the size padded to whole blocks)."""
        from contract.hadamard import padded_size

        return padded_size(self.size, self.spec.block_size)

    @property
    def modulus_bits(self) -> int:
        """m: the codes + L of cohort_max devices (each in 0..2L) sum below 2^m, so never wrap."""
        levels = 2 ** (self.spec.bits - 1) - 1
        return max(1, math.ceil(math.log2(self.cohort_max * 2 * levels + 1)))

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
        out = {**dataclasses.asdict(self.spec), "size": self.size, "layout_sha256": self.layout_sha256,
               "round_key": self.round_key, "rotation_seed": self.rotation_seed,
               "cohort_max": self.cohort_max}
        if fingerprint:
            out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_json(cls, value: object, where: str = "update") -> "RoundSpec":
        """Parse (and check) a round's spec as an assignment carries it; ProtocolError if bad."""
        from contract.errors import ErrorCode, ProtocolError

        fields = ROUND_SPEC.parse(value, where)
        spec = UpdateSpec(**{f.name: fields[f.name] for f in dataclasses.fields(UpdateSpec)})
        try:
            spec.validate(where)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, str(e)) from None
        bound = cls(spec, fields["size"], fields["layout_sha256"], fields["round_key"],
                    fields["rotation_seed"], fields["cohort_max"])
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
    s.Field("clip_norm", s.Num(0, None, "the L2 norm bound of the decoded update; larger is refused (422)")),
    s.Field("weighting", s.Enum(WEIGHTINGS, "examples: weight = local examples (capped at max_weight); "
                                            "uniform: every update weighs 1")),
    s.Field("max_weight", s.Int(1, 2**31, "the largest num_examples an update may carry")),
    s.Field("block_size", s.Int(256, 65536, "values per quantization scale / Hadamard block")),
    s.Field("secure_aggregation", s.Bool(
        "masked updates (contract.secagg): one grid per round, step = 4·clip_norm/(L·sqrt(padded size)), "
        "codes + L and the weight summed modulo 2^m, m = ceil(log2(cohort_max·2L + 1))"), required=False,
            default=False),
    s.Field("size", s.Int(1, 2**31, "N: values in the flat weight vector")),
    s.Field("layout_sha256", SHA256),
    s.Field("round_key", s.Str(200, description="the round this spec is bound to")),
    s.Field("rotation_seed", s.Int(0, 2**63)),
    s.Field("cohort_max", s.Int(0, 2**31, "secure aggregation: the most updates a round sums (else 0)"),
            required=False, default=0),
    s.Field("fingerprint", SHA256, required=False),
], description="How this round's updates are encoded (contract.pipeline); an update names its fingerprint.")
