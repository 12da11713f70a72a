"""The independent implementation's secure aggregation, written from PROTOCOL.md section 10.

X25519, HKDF-SHA256, AES-256-GCM and AES-256-CTR come from `cryptography`;
Shamir's sharing over GF(2^521 − 1) and the mask arithmetic are written here
from the document. `Device` is one phone's part in a round (its secrets may
be given, for the vectors; by default they come from the OS CSPRNG), and
`unmask` the server's, with plain Lagrange interpolation (no error
correction: enough for honest revealers). No `contract/` import.
"""
from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tests.protocol_encoding import b64, unb64

P521 = 2**521 - 1


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def info(label: bytes, a: int, b: int) -> bytes:
    return label + min(a, b).to_bytes(4, "big") + max(a, b).to_bytes(4, "big")


def public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def raw(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def dh(private: X25519PrivateKey, peer: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(peer))


def commitment(domain: bytes, seed: bytes) -> bytes:
    return hashlib.sha256(b"nightjar/secagg/commit" + domain + seed).digest()


def self_key(domain: bytes, seed: bytes) -> bytes:
    return hkdf(seed, domain, b"nightjar/secagg/self")


def prg(key: bytes, count: int) -> np.ndarray:
    """count little-endian uint32 words of the AES-256-CTR keystream, counter block 0."""
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * count))
    return np.frombuffer(stream, "<u4").astype(np.uint64)


def add(words: np.ndarray, key: bytes, sign: int) -> np.ndarray:
    return (words + (prg(key, len(words)) if sign > 0 else (2**32 - prg(key, len(words))))) % 2**32


def shamir(secret: bytes, t: int, xs, coefficients=None) -> dict[int, bytes]:
    coefficients = coefficients if coefficients is not None else [secrets.randbelow(P521) for _ in range(t - 1)]
    poly = [int.from_bytes(secret, "big"), *coefficients]
    return {x: (sum(c * pow(x, k, P521) for k, c in enumerate(poly)) % P521).to_bytes(66, "big") for x in xs}


def lagrange0(shares: dict[int, bytes]) -> bytes:
    """f(0) from exactly enough shares, as 32 bytes."""
    total = 0
    for i, yi in shares.items():
        num, den = 1, 1
        for j in shares:
            if j != i:
                num, den = num * (-j) % P521, den * (i - j) % P521
        total += int.from_bytes(yi, "big") * num * pow(den, -1, P521)
    return (total % P521).to_bytes(32, "big")


def seal(key: bytes, domain: bytes, u: int, v: int, seed_share: bytes, key_share: bytes, nonce: bytes) -> bytes:
    plain = u.to_bytes(4, "big") + v.to_bytes(4, "big") + seed_share + key_share
    return nonce + AESGCM(key).encrypt(nonce, plain, domain + u.to_bytes(4, "big") + v.to_bytes(4, "big"))


def open_(key: bytes, domain: bytes, u: int, v: int, blob: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], domain + u.to_bytes(4, "big") + v.to_bytes(4, "big"))


class Device:
    """One device's secure aggregation for one round (10.2–10.7)."""

    def __init__(self, domain: bytes, enc: bytes | None = None, mask: bytes | None = None, seed: bytes | None = None):
        self.domain = domain
        self.enc = X25519PrivateKey.from_private_bytes(enc) if enc else X25519PrivateKey.generate()
        self.mask = X25519PrivateKey.from_private_bytes(mask) if mask else X25519PrivateKey.generate()
        self.seed = seed if seed is not None else os.urandom(32)
        self.node, self.neighbours, self.held = 0, {}, {}

    def keys(self) -> dict:
        return {"enc_pk": b64(public(self.enc)), "mask_pk": b64(public(self.mask)),
                "commitment": b64(commitment(self.domain, self.seed))}

    def share_key(self, v: int) -> bytes:
        return hkdf(dh(self.enc, self.neighbours[v]["enc_pk"]), self.domain, info(b"nightjar/secagg/share", self.node, v))

    def shares(self, status: dict, coefficients=None, nonces=None) -> dict:
        self.node, t = status["node"], status["threshold"]
        self.neighbours = {n["node"]: {"enc_pk": unb64(n["enc_pk"]), "mask_pk": unb64(n["mask_pk"])}
                           for n in status["neighbours"]}
        seeds = shamir(self.seed, t, self.neighbours, coefficients and coefficients[0])
        keys = shamir(raw(self.mask), t, self.neighbours, coefficients and coefficients[1])
        out = []
        for v in sorted(self.neighbours):
            nonce = nonces[v] if nonces else os.urandom(12)
            out.append({"to": v, "ciphertext": b64(seal(self.share_key(v), self.domain, self.node, v, seeds[v],
                                                         keys[v], nonce))})
        return {"shares": out}

    def receive(self, status: dict) -> None:
        for item in status["inbox"]:
            u = item["from"]
            plain = open_(self.share_key(u), self.domain, u, self.node, unb64(item["ciphertext"]))
            assert plain[:8] == u.to_bytes(4, "big") + self.node.to_bytes(4, "big"), "a share names other devices"
            self.held[u] = (plain[8:74], plain[74:140])

    def masked(self, words) -> np.ndarray:
        out = add(np.asarray(words, np.uint64) % 2**32, self_key(self.domain, self.seed), +1)
        for v in sorted(self.held):
            key = hkdf(dh(self.mask, self.neighbours[v]["mask_pk"]), self.domain, info(b"nightjar/secagg/mask", self.node, v))
            out = add(out, key, +1 if self.node < v else -1)
        return out

    def reveal(self, status: dict) -> dict:
        wanted = {o: "self" for o in status["survivors"]} | {o: "key" for o in status["dropped"]}
        assert not set(status["survivors"]) & set(status["dropped"]), "asked for both shares of one neighbour"
        return {"shares": [{"owner": o, "kind": k, "share": b64(self.held[o][0 if k == "self" else 1])}
                           for o, k in sorted(wanted.items())]}


def unmask(domain: bytes, t: int, members: list[dict], survivors: list[int], reveals: list[dict],
           masked_sum) -> np.ndarray:
    """10.7, the server: the survivors' plaintext sum modulo 2^32 (every revealed share assumed right)."""
    got: dict[int, dict[int, bytes]] = {}
    for r in reveals:
        for item in r["message"]["shares"]:
            got.setdefault(item["owner"], {})[r["node"]] = unb64(item["share"])
    total = np.asarray(masked_sum, np.uint64) % 2**32
    by_node = {m["node"]: m for m in members}
    for v, m in by_node.items():
        secret = lagrange0(dict(sorted(got[v].items())[:t]))
        if v in survivors:
            assert commitment(domain, secret) == unb64(m["commitment"]), f"device {v}'s seed"
            total = add(total, self_key(domain, secret), -1)
            continue
        private = X25519PrivateKey.from_private_bytes(secret)
        assert public(private) == unb64(m["mask_pk"]), f"device {v}'s key"
        for u in m["maskers"]:
            if u in survivors:
                key = hkdf(dh(private, unb64(by_node[u]["mask_pk"])), domain, info(b"nightjar/secagg/mask", v, u))
                total = add(total, key, -1 if u < v else +1)
    return total
