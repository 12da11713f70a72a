"""The Python implementation's function table: what `python -m contract.vectors check` runs by default.

`FUNCTIONS` maps each vector function's name to a callable taking the
case's `input` (a JSON object) and returning its `output` (a JSON object),
as contract.vectors describes. Each one calls the contract's own code (the
phone's and the server's), so a passing check says the Python phone and
server compute what the vectors hold. An implementation in another
language exposes the same names with the same JSON in and out; this module
is also the reading guide to each name.
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.protocol.attestation import AttestationStatement, public_key_text, sign
from contract.protocol.errors import ProtocolError
from contract.model.weights import WeightLayout
from contract.secagg.plausible import ImplausibleSum, bounds
from contract.tasks.discovery import DiscoverySpec, Trie
from contract.tasks.personal import PersonalReport, check_counts
from contract.model.metrics import Hits
from contract.update import hadamard
from contract.update.masked import GridQuantization
from contract.update.packing import pack, pack_uint
from contract.update.pipeline import UpdatePipeline
from contract.update.spec import RoundSpec, UpdateSpec
from contract.update.stages import Clipping, Context, Quantization, Weighting
from contract.vectors.reference_secagg import SECAGG_FUNCTIONS

Function = Callable[[dict], dict]


def canonical(value) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII with \\u escapes, Python's float repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _f64(values) -> list[float]:
    return [float(v) for v in np.asarray(values, np.float64)]


def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


# -- encodings ------------------------------------------------------------------------------------


def canonical_json(i: dict) -> dict:
    text = canonical(i["value"])
    return {"text": text, "sha256_hex": hashlib.sha256(text.encode()).hexdigest()}


def attestation(i: dict) -> dict:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(i["issuer_private_key_hex"]))
    signed = sign(AttestationStatement(**i["statement"]), key)
    data = base64.urlsafe_b64decode(signed.statement + "=" * (-len(signed.statement) % 4))
    return {"statement_text": data.decode(), "statement": signed.statement, "signature": signed.signature,
            "signature_hex": base64.urlsafe_b64decode(signed.signature + "==").hex(),
            "issuer_public_key": public_key_text(key.public_key())}


def layout_sha256(i: dict) -> dict:
    layout = WeightLayout([(e["name"], e["shape"]) for e in i["layout"]])
    return {"layout": layout.to_json(), "size": layout.size, "sha256_hex": layout.sha256}


def round_spec(i: dict) -> dict:
    """An operator's update settings bound to a round (what the assignment's `update` is), and the
    numbers a phone derives from it."""
    b = i["bind"]
    spec = UpdateSpec(**i["update"]).bind(b["size"], b["layout_sha256"], b["round_key"], b["rotation_seed"],
                                         b.get("cohort_max", 0), tuple(b["dp"]) if b.get("dp") else None)
    return {"update": spec.to_json(), **_derived(spec, i.get("weights", []))}


def _derived(spec: RoundSpec, weights: list[int]) -> dict:
    s, pipeline = spec.spec, UpdatePipeline(spec)
    out = {"fingerprint": spec.fingerprint, "padded": spec.padded, "levels": 2 ** (s.bits - 1) - 1 if s.bits < 32 else 0,
           "unit_exponent": pipeline.unit_exponent, "weight_cap": s.weight_cap,
           "clip_bound": {str(w): pipeline.clipping.bound(w) for w in weights}}
    if s.bits < 32 and not s.secure_aggregation:
        out["max_exponent"] = pipeline.stages[-2].max_exponent
    if s.secure_aggregation:
        out.update(grid_step=spec.grid_step, modulus_bits=spec.modulus_bits, grid_rounding=spec.grid_rounding,
                   masked_bound={str(w): spec.masked_bound(w) for w in weights})
    return out


# -- NumPy's random streams -------------------------------------------------------------------------


def seed_sequence(i: dict) -> dict:
    state = np.random.SeedSequence(i["entropy"]).generate_state(i["words"], np.uint64)
    return {"state_hex": [f"{int(w):016x}" for w in state]}


def uniforms(i: dict) -> dict:
    rng = np.random.default_rng([i["seed"], i["stream"]])
    raw = np.random.default_rng([i["seed"], i["stream"]]).bit_generator.random_raw(2)
    return {"first_uint64_hex": [f"{int(w):016x}" for w in raw], "values": _f64(rng.random(i["count"]))}


def rotation_draws(i: dict) -> dict:
    rng = np.random.default_rng([i["seed"], 0x48414441])
    perm = rng.permutation(i["padded"])
    return {"permutation": _ints(perm), "signs": _ints(rng.integers(0, 2, i["padded"]) * 2 - 1)}


# -- the update pipeline's stages -------------------------------------------------------------------


def clip(i: dict) -> dict:
    ctx = Context()
    y = Clipping(i["clip_norm"], 0).encode(np.asarray(i["x"], np.float64), ctx)
    return {"y": _f64(y), "unclipped": ctx.unclipped}


def weight(i: dict) -> dict:
    ctx = Context(num_examples=i["num_examples"])
    y = Weighting(i["weighting"], i["max_weight"]).encode(np.asarray(i["x"], np.float64), ctx)
    return {"y": _f64(y), "weight": ctx.weight}


def rotate(i: dict) -> dict:
    return {"z": _f64(hadamard.rotate(np.asarray(i["x"], np.float64), i["block"], i["seed"]))}


def unrotate(i: dict) -> dict:
    return {"x": _f64(hadamard.unrotate(np.asarray(i["z"], np.float64), i["size"], i["block"], i["seed"]))}


def quantize(i: dict) -> dict:
    stage = Quantization(i["bits"], i["block"], i["unit_exponent"], i["max_exponent"])
    q, e = stage.encode(np.asarray(i["z"], np.float64), Context(seed=i["seed"]))
    ctx = Context()
    stage.accept((q, e), ctx)
    return {"codes": _ints(q), "exponents": _ints(e), "decoded_norm": ctx.norm}


def grid_quantize(i: dict) -> dict:
    grid = GridQuantization(i["bits"], i["step"])
    q = grid.encode(np.asarray(i["z"], np.float64), Context(seed=i["seed"]))
    return {"codes": _ints(q), "norm": grid.norm(q)}


def pack_codes(i: dict) -> dict:
    return {"packed_hex": pack(np.asarray(i["codes"], np.int64), i["bits"]).tobytes().hex()}


def pack_words(i: dict) -> dict:
    return {"packed_hex": pack_uint(np.asarray(i["values"], np.uint64).astype(np.uint32), i["bits"]).tobytes().hex()}


# -- whole encodings, the server's side -------------------------------------------------------------


def _spec(i: dict) -> RoundSpec:
    return RoundSpec.from_json(i["spec"])


def encode_update(i: dict) -> dict:
    encoded = UpdatePipeline(_spec(i)).encode(np.asarray(i["delta"], np.float64), i["num_examples"], i["seed"])
    return {"weight": encoded.weight, "norm": encoded.norm, "body_safetensors_hex": encoded.body.hex()}


def accept_update(i: dict) -> dict:
    try:
        got = UpdatePipeline(_spec(i)).accept(bytes.fromhex(i["body_safetensors_hex"]), i.get("num_examples"))
    except ProtocolError as e:
        return {"error": e.code_name, "status": e.status}
    return {"units": _ints(got.units), "weight": got.weight, "norm": got.norm}


def decode_sum(i: dict) -> dict:
    mean = UpdatePipeline(_spec(i)).finalize(np.asarray(i["units_sum"], np.int64), i["weight_sum"])
    return {"mean": _f64(mean)}


def ring_plaintext(i: dict) -> dict:
    """Under secure aggregation: the integers a device masks (codes + L, then its weight)."""
    ring = UpdatePipeline(_spec(i)).plaintext(np.asarray(i["delta"], np.float64), i["num_examples"], i["seed"])
    return {"ring": _ints(ring)}


def masked_body(i: dict) -> dict:
    """The upload of a masked vector (contract.vectors.reference_secagg.secagg_mask's words modulo 2^32):
    reduced to the ring (the codes modulo 2^m, the tail modulo 2^32) and packed."""
    pipeline = UpdatePipeline(_spec(i))
    ring = pipeline.ring.reduce(np.asarray(i["masked"], np.uint64).astype(np.uint32))    # codes modulo 2^m
    body = pipeline.stages[-1].encode(ring, Context())
    return {"body_safetensors_hex": body.hex()}


def decode_masked_sum(i: dict) -> dict:
    pipeline = UpdatePipeline(_spec(i))
    ring = np.asarray(i["ring_sum"], np.int64)
    try:
        mean = pipeline.finalize_masked(ring, i["survivors"])
    except ImplausibleSum as e:
        return {"error": "implausible_sum", "reason": e.reason}
    return {"weight_sum": int(pipeline.ring.reduce(ring.copy())[pipeline.count]), "mean": _f64(mean)}


def plausible_bounds(i: dict) -> dict:
    spec = _spec(i)
    b = bounds(spec, i["reports"])
    return {"weight_sum": list(b.weight_sum), "coordinate": b.coordinate, "noise_norm": b.noise_norm,
            "count": list(b.count), "rounding": b.rounding,
            "norm": {str(w): b.norm(w) for w in i["weight_sums"]}}


# -- reports -----------------------------------------------------------------------------------------


def personal_report(i: dict) -> dict:
    report = PersonalReport(Hits(**i["global"]), Hits(**i["personal"]), i["fell_back"])
    return {"counts": _ints(report.vector())}


def personal_sum_valid(i: dict) -> dict:
    try:
        check_counts(i["counts"], i["devices"])
    except ValueError:
        return {"valid": False}
    return {"valid": True}


def eval_report_valid(i: dict) -> dict:
    return {"valid": 0 <= i["top1_hits"] <= i["top3_hits"] <= i["positions"]}


def discovery_ballot_valid(i: dict) -> dict:
    trie = Trie.resume(DiscoverySpec(**i["spec"]), i["level"], i["prefixes"], {})
    try:
        trie.check(i["votes"])
    except ValueError:
        return {"valid": False}
    return {"valid": True}


FUNCTIONS: dict[str, Function] = {f.__name__: f for f in (
    canonical_json, attestation, layout_sha256, round_spec, seed_sequence, uniforms, rotation_draws,
    clip, weight, rotate, unrotate, quantize, grid_quantize, pack_codes, pack_words, encode_update,
    accept_update, decode_sum, ring_plaintext, masked_body, decode_masked_sum, plausible_bounds,
    personal_report, personal_sum_valid, eval_report_valid, discovery_ballot_valid)}
FUNCTIONS.update(SECAGG_FUNCTIONS)
