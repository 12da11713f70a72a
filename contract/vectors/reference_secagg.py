"""The Python implementation's secure-aggregation functions (part of contract.vectors.reference's table).

Primitives (X25519, HKDF, the share ciphertext, Shamir, the mask PRG) and a
device's steps in a round, each a pure function of the case's input: the
device's fixed private keys, seed, Shamir coefficients and nonces are inputs
(`DeviceSecAgg` takes them through its seam), so nothing from the OS CSPRNG
enters an output. Keys and shares are base64url in messages (as on the
wire) and hex elsewhere.
"""
from __future__ import annotations

import base64

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from contract.secagg import primitives as p
from contract.secagg import shamir
from contract.secagg.masking import DeviceSecAgg, Member, SecAggError, unmask_report
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


# -- primitives -----------------------------------------------------------------------------------


def x25519(i: dict) -> dict:
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["private_hex"]))
    out = {"public_hex": p.public_bytes(private).hex()}
    if "peer_public_hex" in i:
        out["shared_hex"] = p.shared_secret(private, bytes.fromhex(i["peer_public_hex"])).hex()
    return out


def hkdf(i: dict) -> dict:
    return {"okm_hex": p.hkdf(bytes.fromhex(i["ikm_hex"]), bytes.fromhex(i["salt_hex"]),
                              bytes.fromhex(i["info_hex"])).hex()}


def pair_keys(i: dict) -> dict:
    """The two keys a pair of devices derives: its shares' AES-GCM key (from the encryption key pairs)
    and its pairwise mask key (from the masking key pairs)."""
    domain = i["domain"].encode()
    enc = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["enc_private_hex"]))
    mask = X25519PrivateKey.from_private_bytes(bytes.fromhex(i["mask_private_hex"]))
    a, b = i["a"], i["b"]
    return {"share_info_hex": p.pair_info(p.SHARE_LABEL, a, b).hex(),
            "mask_info_hex": p.pair_info(p.MASK_LABEL, a, b).hex(),
            "share_key_hex": p.share_key(domain, enc, bytes.fromhex(i["peer_enc_public_hex"]), a, b).hex(),
            "pair_mask_key_hex": p.pair_mask_key(domain, mask, bytes.fromhex(i["peer_mask_public_hex"]), a, b).hex()}


def seed_keys(i: dict) -> dict:
    domain, seed = i["domain"].encode(), bytes.fromhex(i["seed_hex"])
    return {"commitment_hex": p.commitment(domain, seed).hex(), "self_mask_key_hex": p.self_mask_key(domain, seed).hex()}


def share_encrypt(i: dict) -> dict:
    blob = p.encrypt_share(bytes.fromhex(i["key_hex"]), i["domain"].encode(), i["sender"], i["receiver"],
                           bytes.fromhex(i["seed_share_hex"]), bytes.fromhex(i["key_share_hex"]),
                           bytes.fromhex(i["nonce_hex"]))
    return {"plaintext_hex": p.share_plaintext(i["sender"], i["receiver"], bytes.fromhex(i["seed_share_hex"]),
                                               bytes.fromhex(i["key_share_hex"])).hex(),
            "aad_hex": p.aad(i["domain"].encode(), i["sender"], i["receiver"]).hex(),
            "ciphertext_hex": blob.hex(), "ciphertext": SecAggShares({1: blob}).to_json()["shares"][0]["ciphertext"]}


def share_decrypt(i: dict) -> dict:
    try:
        plain = p.decrypt_share(bytes.fromhex(i["key_hex"]), i["domain"].encode(), i["sender"], i["receiver"],
                                bytes.fromhex(i["ciphertext_hex"]))
    except InvalidTag:
        return {"error": "invalid_tag"}
    return {"plaintext_hex": plain.hex()}


def shamir_split(i: dict) -> dict:
    shares = shamir.split(bytes.fromhex(i["secret_hex"]), i["threshold"], i["xs"],
                          [int(c, 16) for c in i["coefficients_hex"]])
    return {"shares_hex": {str(x): s.hex() for x, s in shares.items()}}


def shamir_decode(i: dict) -> dict:
    try:
        got = shamir.decode({int(x): bytes.fromhex(s) for x, s in i["shares_hex"].items()}, i["threshold"])
    except ValueError:
        return {"error": "undecodable"}
    return {"secret_hex": got.secret.hex(), "wrong": sorted(got.wrong)}


def mask_stream(i: dict) -> dict:
    words = p.keystream(bytes.fromhex(i["key_hex"]), i["count"])
    return {"keystream_hex": words.tobytes()[:64].hex(), "words": _ints(words)}


# -- a device's steps in a round --------------------------------------------------------------------


def _device(i: dict) -> DeviceSecAgg:
    return DeviceSecAgg(i["domain"].encode(), enc_key=bytes.fromhex(i["enc_private_hex"]),
                        mask_key=bytes.fromhex(i["mask_private_hex"]), seed=bytes.fromhex(i["seed_hex"]))


def _shared(i: dict) -> tuple[DeviceSecAgg, dict[int, bytes]]:
    """A device that has answered the shares phase of `i["shares_status"]`, and what it sent."""
    device = _device(i)
    status = SecAggStatus.from_json(i["shares_status"])
    c = i["coefficients_hex"]
    sent = device.share(status.node, status.threshold, list(status.neighbours),
                        nonces={int(v): bytes.fromhex(n) for v, n in i["nonces_hex"].items()},
                        coefficients=([int(x, 16) for x in c["self"]], [int(x, 16) for x in c["key"]]))
    return device, sent


def secagg_advertise(i: dict) -> dict:
    return {"message": SecAggKeys(_device(i).advertise()).to_json()}


def secagg_share(i: dict) -> dict:
    return {"message": SecAggShares(_shared(i)[1]).to_json()}


def secagg_mask(i: dict) -> dict:
    """The device's masked vector (before the ring's reduction): its plaintext words + its self mask
    ± the pairwise mask of every neighbour whose share is in its masking-phase inbox, modulo 2^32."""
    device = _shared(i)[0]
    try:
        device.receive(SecAggStatus.from_json(i["masking_status"]).inbox)
    except SecAggError:
        return {"error": "refused"}
    return {"masked": _ints(device.mask(np.asarray(i["plaintext"], np.uint64).astype(np.uint32)))}


def secagg_reveal(i: dict) -> dict:
    device = _shared(i)[0]
    status = SecAggStatus.from_json(i["unmasking_status"])
    try:
        device.receive(SecAggStatus.from_json(i["masking_status"]).inbox)
        return {"message": SecAggReveal(device.reveal(list(status.survivors), list(status.dropped))).to_json()}
    except SecAggError:
        return {"error": "refused"}


def secagg_unmask(i: dict) -> dict:
    """The server: the survivors' plaintext sum (modulo 2^32) from the sum of their masked vectors and
    the reveals, and who revealed wrongly; {"error": ...} naming the owners it cannot rebuild."""
    members = {m["node"]: Member(m["node"], _b64d(m["mask_pk"]), _b64d(m["commitment"]), frozenset(m["maskers"]))
               for m in i["members"]}
    shares = {}
    for reveal in i["reveals"]:
        for item in SecAggReveal.from_json(reveal["message"]).shares.items():
            shares.setdefault(item[0], {})[reveal["node"]] = item[1]
    try:
        got = unmask_report(np.asarray(i["masked_sum"], np.uint64).astype(np.uint32), members,
                            set(i["survivors"]), shares, i["threshold"], i["domain"].encode())
    except SecAggError as e:
        return {"error": "unmask_failed", "owners": sorted(e.owners)}
    return {"sum": _ints(got.total), "wrong": {str(r): sorted(o) for r, o in sorted(got.wrong.items())}}


SECAGG_FUNCTIONS = {f.__name__: f for f in (
    x25519, hkdf, pair_keys, seed_keys, share_encrypt, share_decrypt, shamir_split, shamir_decode, mask_stream,
    secagg_advertise, secagg_share, secagg_mask, secagg_reveal, secagg_unmask)}
