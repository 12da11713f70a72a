"""The inputs of the secure-aggregation vectors: primitives, and whole rounds message by message.

A round's devices have fixed keys, seeds, Shamir coefficients and nonces
(`fixed`), so every message in and out is known in advance. `round_file`
plays one round as the server would run it (a complete neighbour graph,
numbered 1..n, every device of it in the masking set) and records each
device's steps as vector cases, the messages as they go over HTTP, and the
server's unmasking and decoding.
"""
from __future__ import annotations

import numpy as np

from contract.secagg.masking import threshold
from contract.secagg.shamir import PRIME
from contract.vectors.cases_update import SECURE_8, SIZE, bound, case, fixed
from contract.vectors.codec import read_safetensors

RFC7748 = ("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
           "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
           "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")


def coefficient(label: str) -> str:
    """A fixed field element below p = 2^521 − 1, as hex."""
    return f"{int.from_bytes(fixed(label, 66), 'big') % PRIME:x}"


def primitives_file() -> dict:
    domain = bound(SECURE_8, cohort_max=3)["fingerprint"]
    keys = {n: {"enc_private_hex": fixed(f"enc/{n}").hex(), "mask_private_hex": fixed(f"mask/{n}").hex()}
            for n in (1, 2)}
    enc_pk = {n: case("", "x25519", {"private_hex": keys[n]["enc_private_hex"]})["output"]["public_hex"] for n in (1, 2)}
    mask_pk = {n: case("", "x25519", {"private_hex": keys[n]["mask_private_hex"]})["output"]["public_hex"] for n in (1, 2)}
    secret, xs = fixed("secret").hex(), [1, 2, 3, 4, 5, 6, 7]
    split = case("shamir: 3 of 7", "shamir_split", {"secret_hex": secret, "threshold": 3, "xs": xs,
                                                    "coefficients_hex": [coefficient("c1"), coefficient("c2")]})
    shares = split["output"]["shares_hex"]
    wrong = dict(shares, **{"2": f"{(int(shares['2'], 16) + 1) % PRIME:0132x}",
                            "6": f"{(int(shares['6'], 16) * 3) % PRIME:0132x}"})
    pair = case("pair keys of devices 1 and 2", "pair_keys", {
        "domain": domain, **keys[1], "peer_enc_public_hex": enc_pk[2],
        "peer_mask_public_hex": mask_pk[2], "a": 1, "b": 2})
    sealed = case("share encryption 1 → 2", "share_encrypt", {
        "key_hex": pair["output"]["share_key_hex"], "domain": domain, "sender": 1, "receiver": 2,
        "seed_share_hex": shares["2"], "key_share_hex": shares["3"], "nonce_hex": fixed("nonce/1/2", 12).hex()})
    blob = sealed["output"]["ciphertext_hex"]
    flipped = blob[:40] + f"{int(blob[40:42], 16) ^ 1:02x}" + blob[42:]
    opened = {"key_hex": pair["output"]["share_key_hex"], "domain": domain}
    cases = [case("RFC 7748 6.1 (Alice's key, Bob's public key)", "x25519",
                  {"private_hex": RFC7748[0], "peer_public_hex": RFC7748[1]}),
             case("X25519 of devices 1 and 2's encryption keys", "x25519",
                  {"private_hex": keys[1]["enc_private_hex"], "peer_public_hex": enc_pk[2]}),
             case("RFC 5869 A.1 (first 32 bytes)", "hkdf", {"ikm_hex": "0b" * 22, "salt_hex": bytes(range(13)).hex(),
                                                              "info_hex": bytes(range(0xf0, 0xfa)).hex()}),
             pair,
             case("the other end derives the same keys", "pair_keys", {
                 "domain": domain, **keys[2], "peer_enc_public_hex": enc_pk[1],
                 "peer_mask_public_hex": mask_pk[1], "a": 2, "b": 1}),
             case("commitment and self-mask key", "seed_keys", {"domain": domain, "seed_hex": fixed("seed/1").hex()}),
             sealed,
             case("share decryption", "share_decrypt", {**opened, "sender": 1, "receiver": 2, "ciphertext_hex": blob}),
             case("a tampered share does not decrypt", "share_decrypt",
                  {**opened, "sender": 1, "receiver": 2, "ciphertext_hex": flipped}),
             case("a share for another receiver does not decrypt", "share_decrypt",
                  {**opened, "sender": 2, "receiver": 1, "ciphertext_hex": blob}),
             split,
             case("rebuild from exactly 3", "shamir_decode", {"shares_hex": {x: shares[x] for x in "135"}, "threshold": 3}),
             case("rebuild from 7, two wrong: corrected and named", "shamir_decode", {"shares_hex": wrong, "threshold": 3}),
             case("5 with two wrong cannot be corrected", "shamir_decode",
                  {"shares_hex": {x: wrong[x] for x in "12456"}, "threshold": 3}),
             case("a malformed share is set aside", "shamir_decode",
                  {"shares_hex": {**{x: shares[x] for x in "1234"}, "5": shares["5"][:-2]}, "threshold": 3}),
             case("mask stream", "mask_stream", {"key_hex": pair["output"]["pair_mask_key_hex"], "count": 12})]
    return {"title": "Secure aggregation's primitives: X25519, HKDF, keys, share encryption, Shamir, the mask PRG",
            "cases": cases}


def _device(node: int) -> dict:
    return {"enc_private_hex": fixed(f"round/enc/{node}").hex(), "mask_private_hex": fixed(f"round/mask/{node}").hex(),
            "seed_hex": fixed(f"round/seed/{node}").hex()}


def _status(phase: str, node: int | None = None, t: int | None = None, **lists) -> dict:
    out = {"phase": phase, "wait_s": None, "done": False, "node": node, "threshold": t, "neighbours": [],
           "inbox": [], "survivors": [], "dropped": []}
    out.update(lists)
    return out


def round_file(n: int, dropped: tuple[int, ...] = ()) -> dict:
    """A secure round of `n` devices (nodes 1..n, the complete graph) in which `dropped` share but never
    upload: every device's steps, the messages, the server's unmasking and the decoded mean."""
    spec = bound(SECURE_8, round_key=f"vectors/secure-{n}", cohort_max=n)
    domain, t, nodes = spec["fingerprint"], threshold(n - 1), list(range(1, n + 1))
    devices = {v: {"domain": domain, **_device(v)} for v in nodes}
    cases, messages = [], []
    keys = {}
    for v in nodes:
        made = case(f"device {v}: advertise", "secagg_advertise", devices[v])
        keys[v] = made["output"]["message"]
        cases.append(made)
        messages.append({"device": v, "request": "POST /v1/sessions/<session>/secagg/keys", "body": keys[v]})
    sent = {}
    for v in nodes:
        status = _status("shares", v, t, neighbours=[{"node": u, "enc_pk": keys[u]["enc_pk"], "mask_pk": keys[u]["mask_pk"]}
                                                     for u in nodes if u != v])
        devices[v].update(shares_status=status, nonces_hex={str(u): fixed(f"round/nonce/{v}/{u}", 12).hex() for u in nodes if u != v},
                          coefficients_hex={kind: [coefficient(f"round/{kind}/{v}/{j}") for j in range(1, t)]
                                            for kind in ("self", "key")})
        made = case(f"device {v}: share", "secagg_share", devices[v])
        sent[v] = made["output"]["message"]["shares"]
        cases.append(made)
        messages += [{"device": v, "response": "GET /v1/sessions/<session>/secagg", "body": status},
                     {"device": v, "request": "POST /v1/sessions/<session>/secagg/shares", "body": made["output"]["message"]}]
    survivors = [v for v in nodes if v not in dropped]
    masked = {}
    for v in survivors:
        inbox = [{"from": u, "ciphertext": s["ciphertext"]} for u in nodes for s in sent[u] if s["to"] == v]
        devices[v]["masking_status"] = _status("masking", v, t, inbox=inbox)
        delta = [float(x) for x in np.asarray(np.random.default_rng(300 + v).normal(0, 0.02, SIZE), np.float32)]
        plain = case(f"device {v}: the plaintext ring", "ring_plaintext",
                     {"spec": spec, "delta": delta, "num_examples": 10 + 15 * v, "seed": 5000 + v})
        made = case(f"device {v}: mask", "secagg_mask", {**devices[v], "plaintext": plain["output"]["ring"]})
        body = case(f"device {v}: the masked upload", "masked_body", {"spec": spec, "masked": made["output"]["masked"]})
        masked[v] = body["output"]["body_safetensors_hex"]
        cases += [plain, made, body]
        messages += [{"device": v, "response": "GET /v1/sessions/<session>/secagg", "body": devices[v]["masking_status"]},
                     {"device": v, "request": "POST /v1/sessions/<session>/update?model_version=0",
                      "content_type": "application/octet-stream", "body_safetensors_hex": masked[v]}]
    reveals = []
    for v in survivors:
        others = [u for u in nodes if u != v]
        status = _status("unmasking", v, t, survivors=[u for u in others if u in survivors],
                         dropped=[u for u in others if u not in survivors])
        made = case(f"device {v}: reveal", "secagg_reveal", {**devices[v], "unmasking_status": status})
        reveals.append({"node": v, "message": made["output"]["message"]})
        cases.append(made)
        messages += [{"device": v, "response": "GET /v1/sessions/<session>/secagg", "body": status},
                     {"device": v, "request": "POST /v1/sessions/<session>/secagg/reveal", "body": made["output"]["message"]}]
    cases += _server(spec, domain, t, nodes, keys, survivors, masked, reveals)
    return {"title": f"A secure round of {n} devices" + (f", device {', '.join(map(str, dropped))} dropping out after "
                                                         "sharing" if dropped else ", every one reporting"),
            "spec": spec, "devices": {str(v): _device(v) for v in nodes}, "messages": messages, "cases": cases}


def _server(spec: dict, domain: str, t: int, nodes: list[int], keys: dict, survivors: list[int],
            masked: dict[int, str], reveals: list[dict]) -> list[dict]:
    """The server's half: the survivors' masked uploads summed in the ring, unmasked, decoded."""
    count = -(-spec["size"] // spec["block_size"]) * spec["block_size"]
    words = []
    for v in survivors:
        parsed = read_safetensors(bytes.fromhex(masked[v]))
        bits = int(parsed["metadata"]["modulus_bits"])
        tensors = parsed["tensors"]
        words.append(_unpack(bytes.fromhex(tensors["masked"]["data_hex"]), bits, count)
                     + [int(x) for x in np.frombuffer(bytes.fromhex(tensors["weight"]["data_hex"]), "<u4")])
    moduli = [2**bits] * count + [2**32] * (len(words[0]) - count)
    masked_sum = [sum(column) % m for column, m in zip(zip(*words), moduli)]
    members = [{"node": v, "mask_pk": keys[v]["mask_pk"], "commitment": keys[v]["commitment"],
                "maskers": [u for u in nodes if u != v]} for v in nodes]
    unmasked = case("server: unmask", "secagg_unmask", {"domain": domain, "threshold": t, "members": members,
                                                        "survivors": survivors, "reveals": reveals,
                                                        "masked_sum": masked_sum})
    ring = [w % m for w, m in zip(unmasked["output"]["sum"], moduli)]
    decoded = case("server: decode the unmasked sum", "decode_masked_sum",
                   {"spec": spec, "ring_sum": ring, "survivors": len(survivors)})
    return [unmasked, decoded]


def _unpack(data: bytes, bits: int, count: int) -> list[int]:
    """`count` words of `bits` bits, packed little end first (PROTOCOL.md, "Bit packing")."""
    stream = int.from_bytes(data, "little")
    return [(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]
