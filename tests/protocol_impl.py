"""A second function table for the known-answer vectors, written from PROTOCOL.md without the contract's code.

    python -m contract.vectors check --impl tests.protocol_impl

runs every vector whose function this table has through it (the phone's
side, and the server's mean and checks; not the server's per-update
refusals nor Reed–Solomon decoding, which a phone never runs). The
constructions are tests/protocol_encoding.py, protocol_pipeline.py and
protocol_secagg.py; this module only maps each vector's JSON in and out.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests import protocol_pipeline as pipe
from tests import protocol_secagg as sa
from tests.protocol_encoding import PCG64, Spec, b64, bind, canonical, pack_codes, pack_words, seed_state


def _f(values) -> list[float]:
    return [float(v) for v in values]


def _i(values) -> list[int]:
    return [int(v) for v in values]


def canonical_json(i):
    text = canonical(i["value"])
    return {"text": text.decode(), "sha256_hex": hashlib.sha256(text).hexdigest()}


def attestation(i):
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(i["issuer_private_key_hex"]))
    data = canonical(i["statement"])
    signature = key.sign(data)
    return {"statement_text": data.decode(), "statement": b64(data), "signature": b64(signature),
            "signature_hex": signature.hex(),
            "issuer_public_key": b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}


def layout_sha256(i):
    layout, offset = [], 0
    for e in i["layout"]:
        layout.append({"name": e["name"], "shape": e["shape"], "offset": offset})
        offset += int(np.prod(e["shape"]))
    return {"layout": layout, "size": offset, "sha256_hex": hashlib.sha256(canonical(layout)).hexdigest()}


def round_spec(i):
    b = i["bind"]
    update = bind(i["update"], b["size"], b["layout_sha256"], b["round_key"], b["rotation_seed"],
                  b.get("cohort_max", 0), b.get("dp"))
    return {"update": update, **Spec(update).derived(i.get("weights", []))}


def seed_sequence(i):
    return {"state_hex": [f"{w:016x}" for w in seed_state(i["entropy"], i["words"])]}


def uniforms(i):
    first = PCG64([i["seed"], i["stream"]])
    return {"first_uint64_hex": [f"{first.next_uint64():016x}" for _ in range(2)],
            "values": _f(PCG64([i["seed"], i["stream"]]).random(i["count"]))}


def rotation_draws(i):
    rng = PCG64([i["seed"], 0x48414441])
    perm = rng.permutation(i["padded"])
    return {"permutation": perm, "signs": [2 * b - 1 for b in rng.bits(i["padded"])]}


def clip(i):
    y, unclipped = pipe.clip(np.asarray(i["x"], np.float64), i["clip_norm"])
    return {"y": _f(y), "unclipped": unclipped}


def weight(i):
    y, w = pipe.weight(np.asarray(i["x"], np.float64), i["num_examples"], i["weighting"], i["max_weight"])
    return {"y": _f(y), "weight": w}


def rotate(i):
    return {"z": _f(pipe.rotate(np.asarray(i["x"], np.float64), i["block"], i["seed"]))}


def unrotate(i):
    return {"x": _f(pipe.unrotate(np.asarray(i["z"], np.float64), i["size"], i["block"], i["seed"]))}


def quantize(i):
    codes, exps = pipe.quantize(np.asarray(i["z"], np.float64), i["bits"], i["block"], i["unit_exponent"],
                                i["max_exponent"], i["seed"])
    return {"codes": _i(codes), "exponents": exps, "decoded_norm": pipe.quantized_norm(codes, exps, i["block"])}


def grid_quantize(i):
    q, norm = pipe.grid(np.asarray(i["z"], np.float64), i["bits"], i["step"], i["seed"])
    return {"codes": _i(q), "norm": norm}


def encode_update(i):
    body, w, norm, _, _ = pipe.encode(Spec(i["spec"]), i["delta"], i["num_examples"], i["seed"])
    return {"weight": w, "norm": norm, "body_safetensors_hex": body.hex()}


def decode_sum(i):
    return {"mean": _f(pipe.mean_of_sum(Spec(i["spec"]), i["units_sum"], i["weight_sum"]))}


def ring_plaintext(i):
    return {"ring": pipe.ring_plaintext(Spec(i["spec"]), i["delta"], i["num_examples"], i["seed"])[0]}


def masked_body(i):
    return {"body_safetensors_hex": pipe.masked_body(Spec(i["spec"]), i["masked"]).hex()}


def decode_masked_sum(i):
    got = pipe.decode_masked(Spec(i["spec"]), i["ring_sum"], i["survivors"])
    if isinstance(got, str):
        return {"error": "implausible_sum", "reason": got}
    return {"weight_sum": got[0], "mean": _f(got[1])}


def personal_report(i):
    g, p = i["global"], i["personal"]
    counts = [g["top1"], g["top3"], p["top1"], p["top3"], g["positions"], 1] + [0] * 43
    n = max(g["positions"], 1)
    counts[6 + min(math.floor(g["top1"] / n * 20), 19)] = 1
    counts[26 + min(math.floor(p["top1"] / n * 20), 19)] = 1
    counts[46:] = [int(p["top1"] > g["top1"]), int(p["top1"] < g["top1"]), int(i["fell_back"])]
    return {"counts": counts}


def personal_sum_valid(i):
    c, n = i["counts"], i["devices"]
    if len(c) != 49 or not all(isinstance(x, int) and 0 <= x < 2**53 for x in c):
        return {"valid": False}
    ok = (c[0] <= c[1] <= c[4] and c[2] <= c[3] <= c[4] and c[5] == n and sum(c[6:26]) == n == sum(c[26:46])
          and max(c[46:]) <= n and c[46] + c[47] <= n)
    return {"valid": ok}


def eval_report_valid(i):
    return {"valid": 0 <= i["top1_hits"] <= i["top3_hits"] <= i["positions"]}


def discovery_ballot_valid(i):
    import re

    votes, level = i["votes"], i["level"]
    ok = len(votes) <= i["spec"]["votes_per_device"] and len(set(votes)) == len(votes) and all(
        len(v) == level and v[:-1] in i["prefixes"] and re.fullmatch(r"[a-z0-9][a-z0-9']*\$?", v) for v in votes)
    return {"valid": bool(ok)}


FUNCTIONS = {f.__name__: f for f in (
    canonical_json, attestation, layout_sha256, round_spec, seed_sequence, uniforms, rotation_draws, clip, weight,
    rotate, unrotate, quantize, grid_quantize, encode_update, decode_sum, ring_plaintext, masked_body,
    decode_masked_sum, personal_report, personal_sum_valid, eval_report_valid, discovery_ballot_valid)}
FUNCTIONS.update(pack_codes=lambda i: {"packed_hex": pack_codes(i["codes"], i["bits"]).hex()},
                 pack_words=lambda i: {"packed_hex": pack_words(i["values"], i["bits"]).hex()})


# -- secure aggregation ---------------------------------------------------------------------------

def _x25519(i):
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["private_hex"]))
    out = {"public_hex": sa.public(private).hex()}
    if "peer_public_hex" in i:
        out["shared_hex"] = sa.dh(private, bytes.fromhex(i["peer_public_hex"])).hex()
    return out


def _pair_keys(i):
    d, a, b = i["domain"].encode(), i["a"], i["b"]
    enc = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["enc_private_hex"]))
    mask = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["mask_private_hex"]))
    return {"share_info_hex": sa.info(b"nightjar/secagg/share", a, b).hex(),
            "mask_info_hex": sa.info(b"nightjar/secagg/mask", a, b).hex(),
            "share_key_hex": sa.hkdf(sa.dh(enc, bytes.fromhex(i["peer_enc_public_hex"])), d,
                                     sa.info(b"nightjar/secagg/share", a, b)).hex(),
            "pair_mask_key_hex": sa.hkdf(sa.dh(mask, bytes.fromhex(i["peer_mask_public_hex"])), d,
                                         sa.info(b"nightjar/secagg/mask", a, b)).hex()}


def _share_encrypt(i):
    blob = sa.seal(bytes.fromhex(i["key_hex"]), i["domain"].encode(), i["sender"], i["receiver"],
                   bytes.fromhex(i["seed_share_hex"]), bytes.fromhex(i["key_share_hex"]), bytes.fromhex(i["nonce_hex"]))
    u, v = i["sender"].to_bytes(4, "big"), i["receiver"].to_bytes(4, "big")
    return {"plaintext_hex": (u + v + bytes.fromhex(i["seed_share_hex"]) + bytes.fromhex(i["key_share_hex"])).hex(),
            "aad_hex": (i["domain"].encode() + u + v).hex(), "ciphertext_hex": blob.hex(), "ciphertext": b64(blob)}


def _share_decrypt(i):
    from cryptography.exceptions import InvalidTag

    try:
        return {"plaintext_hex": sa.open_(bytes.fromhex(i["key_hex"]), i["domain"].encode(), i["sender"],
                                          i["receiver"], bytes.fromhex(i["ciphertext_hex"])).hex()}
    except InvalidTag:
        return {"error": "invalid_tag"}


def _device(i) -> sa.Device:
    device = sa.Device(i["domain"].encode(), bytes.fromhex(i["enc_private_hex"]), bytes.fromhex(i["mask_private_hex"]),
                       bytes.fromhex(i["seed_hex"]))
    if "shares_status" in i:
        c = i["coefficients_hex"]
        sent = device.shares(i["shares_status"], ([int(x, 16) for x in c["self"]], [int(x, 16) for x in c["key"]]),
                             {int(v): bytes.fromhex(n) for v, n in i["nonces_hex"].items()})
        device.sent = sent
    if "masking_status" in i:
        device.receive(i["masking_status"])
    return device


def _unmask(i):
    total = sa.unmask(i["domain"].encode(), i["threshold"], i["members"], i["survivors"], i["reveals"], i["masked_sum"])
    return {"sum": _i(total), "wrong": {}}


FUNCTIONS.update(
    x25519=_x25519, pair_keys=_pair_keys, share_encrypt=_share_encrypt, share_decrypt=_share_decrypt,
    hkdf=lambda i: {"okm_hex": sa.hkdf(*(bytes.fromhex(i[k]) for k in ("ikm_hex", "salt_hex", "info_hex"))).hex()},
    seed_keys=lambda i: {"commitment_hex": sa.commitment(i["domain"].encode(), bytes.fromhex(i["seed_hex"])).hex(),
                         "self_mask_key_hex": sa.self_key(i["domain"].encode(), bytes.fromhex(i["seed_hex"])).hex()},
    shamir_split=lambda i: {"shares_hex": {str(x): s.hex() for x, s in sa.shamir(
        bytes.fromhex(i["secret_hex"]), i["threshold"], i["xs"], [int(c, 16) for c in i["coefficients_hex"]]).items()}},
    mask_stream=lambda i: {"words": _i(sa.prg(bytes.fromhex(i["key_hex"]), i["count"])),
                           "keystream_hex": np.asarray(sa.prg(bytes.fromhex(i["key_hex"]), i["count"]), "<u4")
                           .tobytes()[:64].hex()},
    secagg_advertise=lambda i: {"message": _device(i).keys()},
    secagg_share=lambda i: {"message": _device(i).sent},
    secagg_mask=lambda i: {"masked": _i(_device(i).masked(i["plaintext"]))},
    secagg_reveal=lambda i: {"message": _device(i).reveal(i["unmasking_status"])},
    secagg_unmask=_unmask)
