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


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """The update pipeline's settings (see contract.pipeline for what each stage does)."""

    bits: int = 8                       # 32 (float32, as sent before quantization existed), 16, 8, 4, 2
    rotation: bool = False              # randomized Hadamard rotation before quantizing (Suresh et al.)
    clip_norm: float = DEFAULT_CLIP_NORM   # the device scales its update to L2 norm <= this
    weighting: str = "examples"         # "examples": weight = local examples, capped; "uniform": 1 each
    max_weight: int = DEFAULT_MAX_WEIGHT   # cap on an update's weight (examples), and its upper bound
    block_size: int = DEFAULT_BLOCK_SIZE   # values per quantization scale (and per Hadamard block)

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
        return self

    def scaled_to_epochs(self, epochs: int) -> "UpdateSpec":
        """The default cap counts one epoch's examples; a task of several epochs reports more."""
        return dataclasses.replace(self, max_weight=self.max_weight * max(1, int(epochs)))

    @property
    def weight_cap(self) -> int:
        """W: the largest weight an update may carry (1 when every device weighs the same)."""
        return 1 if self.weighting == "uniform" else self.max_weight

    def bind(self, size: int, layout_sha256: str, round_key: str, seed: int) -> "RoundSpec":
        return RoundSpec(self.validate(), size, layout_sha256, round_key, seed)


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """An `UpdateSpec` bound to one round of one population (what an assignment carries)."""

    spec: UpdateSpec
    size: int               # values in the flat weight vector (contract.weights.WeightLayout.size)
    layout_sha256: str      # the layout they are in (contract.weights.WeightLayout.sha256)
    round_key: str          # "<population>/<round number>"
    rotation_seed: int      # the round's rotation (every device of the round uses the same)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything above: what an encoded update must name."""
        return hashlib.sha256(json.dumps(self.to_json(fingerprint=False), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    def to_json(self, fingerprint: bool = True) -> dict:
        out = {**dataclasses.asdict(self.spec), "size": self.size, "layout_sha256": self.layout_sha256,
               "round_key": self.round_key, "rotation_seed": self.rotation_seed}
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
                    fields["rotation_seed"])
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
    s.Field("size", s.Int(1, 2**31, "N: values in the flat weight vector")),
    s.Field("layout_sha256", SHA256),
    s.Field("round_key", s.Str(200, description="the round this spec is bound to")),
    s.Field("rotation_seed", s.Int(0, 2**63)),
    s.Field("fingerprint", SHA256, required=False),
], description="How this round's updates are encoded (contract.pipeline); an update names its fingerprint.")
