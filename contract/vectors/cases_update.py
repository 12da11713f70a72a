"""The inputs of the encoding, random-stream, stage, packing and update vectors (contract.vectors.generate).

Every input is fixed here: weights from NumPy generators of fixed seeds,
keys from SHA-256 of fixed labels. Each builder returns a vector file's
content; `case` computes the expected output with the reference table.
Cases whose update is clipped are checked to be insensitive to a few ulps in
the norm (`robust`): the norm's summation order is the one thing a second
implementation may do differently without being wrong.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from contract.vectors.codec import canonical_body
from contract.vectors.reference import FUNCTIONS

LAYOUT = [{"name": "embedding", "shape": [10, 12]}, {"name": "lstm/kernel", "shape": [12, 10]},
          {"name": "output/bias", "shape": [60]}]
SIZE = 300
ROTATION_SEED = 6_150_233_891_127_474_919       # any 63-bit value: the round's, as the spec carries it


def fixed(label: str, n: int = 32) -> bytes:
    """`n` fixed bytes named by `label` (SHA-512 of it, cut): vectors' keys, seeds and nonces."""
    return hashlib.sha512(f"nightjar-vectors/{label}".encode()).digest()[:n]


def case(name: str, function: str, inputs: dict, tolerance: dict | None = None) -> dict:
    """One vector: the reference's output for `inputs` (safetensors bodies in canonical form)."""
    output = FUNCTIONS[function](inputs)
    for key, value in list(output.items()):
        if key.endswith("_safetensors_hex"):
            output[key] = canonical_body(value)
    out = {"name": name, "function": function, "input": inputs, "output": output}
    if tolerance:
        out["tolerance"] = tolerance
    return out


def robust(made: dict, vary: Callable[[float], dict]) -> dict:
    """`made`, after checking that inputs a few ulps away (`vary(factor)`) give the same output."""
    for factor in (1 + 2**-50, 1 - 2**-50, 1 + 2**-48):
        other = FUNCTIONS[made["function"]](vary(factor))
        same = {k: v for k, v in other.items() if k != "norm"}
        expected = {k: v for k, v in made["output"].items() if k != "norm"}
        if {k: canonical_body(v) if k.endswith("_safetensors_hex") else v for k, v in same.items()} != expected:
            raise AssertionError(f"vector {made['name']!r} changes with a {factor!r} change of its input: "
                                 "choose another seed")
    return made


def layout_hash() -> str:
    return FUNCTIONS["layout_sha256"]({"layout": LAYOUT})["sha256_hex"]


def bound(update: dict, round_key: str = "vectors/1", cohort_max: int = 0, dp=None) -> dict:
    """The assignment's `update` object of a round with these settings."""
    bind = {"size": SIZE, "layout_sha256": layout_hash(), "round_key": round_key, "rotation_seed": ROTATION_SEED,
            "cohort_max": cohort_max, "dp": dp}
    return FUNCTIONS["round_spec"]({"update": update, "bind": bind})["update"]


PLAIN_8 = {"bits": 8, "rotation": True, "clip_norm": 2.5, "weighting": "examples", "max_weight": 100,
           "block_size": 256}
SECURE_8 = {**PLAIN_8, "secure_aggregation": True}


def encoding_file() -> dict:
    values = [{"b": [1, 2.5, None, True], "a": "x"}, {"clip_norm": 5.0, "tiny": 1e-05, "big": 1e16, "third": 1 / 3,
                                                     "int": 5, "neg": -0.0},
              {"word": "caf\u00e9 \u2014 \U0001F600", "ctl": "tab\there\nquote\"back\\slash/"}, [], {}]
    statement = {"population": "en", "nonce": "q3Zb8l1GmUeTqRkQvY0nY0cM4xwS9fPAhD7sFz2qkLw",
                 "verdict": "MEETS_DEVICE_INTEGRITY", "app_id": "com.example.keyboard", "issued_at": 1795480212.25,
                 "version": 1}
    return {"title": "Canonical JSON, the attestation's signature input, the layout hash",
            "cases": [case(f"canonical json {k}", "canonical_json", {"value": v}) for k, v in enumerate(values)]
            + [case("attestation", "attestation", {"issuer_private_key_hex": fixed("issuer").hex(),
                                                   "statement": statement}),
               case("layout", "layout_sha256", {"layout": LAYOUT})]}


def round_spec_file() -> dict:
    bind = {"size": SIZE, "layout_sha256": layout_hash(), "round_key": "vectors/1", "rotation_seed": ROTATION_SEED}
    specs = [("8 bits, rotation, example weighting", PLAIN_8, {}),
             ("4 bits, no rotation", {**PLAIN_8, "bits": 4, "rotation": False}, {}),
             ("32 bits (float32 values)", {**PLAIN_8, "bits": 32, "rotation": False}, {}),
             ("uniform weighting: max_weight is 1", {**PLAIN_8, "weighting": "uniform"}, {}),
             ("an integer clip_norm in the config is a float on the wire", {**PLAIN_8, "clip_norm": 5}, {}),
             ("secure aggregation, cohort of 3", SECURE_8, {"cohort_max": 3}),
             ("secure aggregation, 4 bits, cohort of 1000", {**SECURE_8, "bits": 4}, {"cohort_max": 1000}),
             ("central DP", {**PLAIN_8, "weighting": "uniform"}, {"dp": ["central", 0.05, 20, 1.0]}),
             ("distributed DP under secure aggregation", {**SECURE_8, "weighting": "uniform"},
              {"cohort_max": 20, "dp": ["distributed", 0.05, 20, 1.0]})]
    return {"title": "Round specs: the assignment's `update`, its fingerprint and the numbers derived from it",
            "cases": [case(name, "round_spec", {"update": u, "bind": {**bind, **extra}, "weights": [1, 7, 40, 100]})
                      for name, u, extra in specs]}


def random_file() -> dict:
    cases = [case(f"seed sequence {e}", "seed_sequence", {"entropy": e, "words": 4})
             for e in ([0, 0x53524E44], [5, 0x48414441], [2**40 + 3, 0x53524E44], [1, 2, 0x524F54])]
    cases += [case(f"rounding uniforms, seed {s}", "uniforms", {"seed": s, "stream": 0x53524E44, "count": 16})
              for s in (0, 12345, 2**33 + 7)]
    cases += [case("rotation draws, 512", "rotation_draws", {"seed": ROTATION_SEED, "padded": 512}),
              case("rotation draws, 5 (odd counts of 32-bit draws)", "rotation_draws", {"seed": 3, "padded": 5})]
    return {"title": "NumPy's seeded streams: SeedSequence, PCG64, uniforms, the rotation's permutation and signs",
            "cases": cases}


def _vector(seed: int, n: int, scale: float) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).normal(0, scale, n)]


def stages_file() -> dict:
    x = _vector(1, SIZE, 0.2)              # norm ~ 3.5: clipped at 2.5
    z = FUNCTIONS["rotate"]({"x": x, "block": 256, "seed": ROTATION_SEED})["z"]
    cases = [case("clip: above the norm", "clip", {"x": x, "clip_norm": 2.5}, {"y": 1e-12}),
             case("clip: within it", "clip", {"x": x, "clip_norm": 10.0}),
             case("weight by examples", "weight", {"x": x[:8], "num_examples": 40, "weighting": "examples",
                                                   "max_weight": 100}),
             case("weight capped", "weight", {"x": x[:8], "num_examples": 400, "weighting": "examples",
                                              "max_weight": 100}),
             case("weight uniform", "weight", {"x": x[:8], "num_examples": 400, "weighting": "uniform",
                                               "max_weight": 1}),
             case("rotate", "rotate", {"x": x, "block": 256, "seed": ROTATION_SEED}),
             case("unrotate", "unrotate", {"z": z, "size": SIZE, "block": 256, "seed": ROTATION_SEED})]
    for bits in (2, 4, 8, 16):
        L = 2 ** (bits - 1) - 1
        top = int(np.ceil(np.log2(2.5 / L)))
        cases.append(case(f"quantize {bits} bits", "quantize", {"z": z, "bits": bits, "block": 256,
                                                                "unit_exponent": -38, "max_exponent": top,
                                                                "seed": 77}))
    zero_block = [0.0] * 256 + z[:256]
    cases.append(case("quantize: an all-zero block takes the smallest scale", "quantize", {
        "z": zero_block, "bits": 8, "block": 256, "unit_exponent": -38, "max_exponent": -5, "seed": 78}))
    step = FUNCTIONS["round_spec"]({"update": SECURE_8, "bind": {"size": SIZE, "layout_sha256": layout_hash(),
                                    "round_key": "vectors/1", "rotation_seed": ROTATION_SEED, "cohort_max": 3}})
    cases.append(case("grid quantize (secure aggregation)", "grid_quantize",
                      {"z": z, "bits": 8, "step": step["grid_step"], "seed": 79}))
    return {"title": "The update pipeline's stages, one at a time", "cases": cases}


def packing_file() -> dict:
    rng = np.random.default_rng(5)
    cases = []
    for bits, n in ((2, 11), (4, 9), (8, 6), (16, 5)):
        L = 2 ** (bits - 1) - 1
        cases.append(case(f"pack {bits} bits", "pack_codes", {"codes": [int(v) for v in rng.integers(-L, L + 1, n)],
                                                              "bits": bits}))
    for bits, n in ((1, 13), (7, 5), (10, 9), (11, 7), (13, 5), (19, 3), (32, 3)):
        top = 2**bits - 1
        values = [int(v) for v in rng.integers(0, top, n, endpoint=True)]
        values[0] = top
        cases.append(case(f"pack {bits}-bit words", "pack_words", {"values": values, "bits": bits}))
    return {"title": "Bit packing: codes at 2/4/8/16 bits, masked words at any width from 1 to 32", "cases": cases}
