"""Secure aggregation's byte-level constructions: key derivation, share encryption, the mask PRG.

Everything here is a pure function of its arguments (no randomness is
drawn), so contract.secagg.masking's device and server halves and the
known-answer vectors (contract.vectors) compute the same bytes; PROTOCOL.md,
"Secure aggregation", is the prose. Every value is bound to the round by
`domain`, the round spec's fingerprint as 64 ASCII hex characters:

* HKDF-SHA256 (RFC 5869), 32-byte output, salt = domain, info = a label and,
  for pairwise keys, the two devices' node numbers (smaller first, 4 bytes
  big-endian each);
* a share travels as nonce (12) ‖ AES-256-GCM(plaintext) ‖ tag (16), the
  plaintext being sender (4) ‖ receiver (4) ‖ self-seed share (66) ‖
  masking-key share (66), the associated data domain ‖ sender (4) ‖ receiver (4);
* a mask is the AES-256-CTR keystream under a 32-byte key, initial counter
  block all zero (the whole 16-byte block counts up, big-endian), read as
  little-endian uint32 words.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from contract.secagg.shamir import SHARE_BYTES

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_PLAINTEXT = 8 + 2 * SHARE_BYTES                        # sender, receiver, the two shares
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES
WORD_MODULUS = 2**32      # masks, masked vectors and their sums are uint32 words, modulo this

COMMIT_LABEL = b"nightjar/secagg/commit"
SELF_LABEL = b"nightjar/secagg/self"
MASK_LABEL = b"nightjar/secagg/mask"
SHARE_LABEL = b"nightjar/secagg/share"


def hkdf(secret: bytes, domain: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of `secret` with salt `domain`: 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=domain, info=info).derive(secret)


def pair_info(label: bytes, a: int, b: int) -> bytes:
    """`label` ‖ min(a, b) ‖ max(a, b), each 4 bytes big-endian: the same for both ends of a pair."""
    low, high = sorted((a, b))
    return label + low.to_bytes(4, "big") + high.to_bytes(4, "big")


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def shared_secret(private: X25519PrivateKey, peer: bytes) -> bytes:
    """X25519(private, peer's raw 32-byte public key)."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer))


def commitment(domain: bytes, seed: bytes) -> bytes:
    """SHA-256(COMMIT_LABEL ‖ domain ‖ seed): the self-mask seed, bound to the round."""
    return hashlib.sha256(COMMIT_LABEL + domain + seed).digest()


def self_mask_key(domain: bytes, seed: bytes) -> bytes:
    return hkdf(seed, domain, SELF_LABEL)


def pair_mask_key(domain: bytes, private: X25519PrivateKey, peer: bytes, a: int, b: int) -> bytes:
    return hkdf(shared_secret(private, peer), domain, pair_info(MASK_LABEL, a, b))


def share_key(domain: bytes, private: X25519PrivateKey, peer: bytes, a: int, b: int) -> bytes:
    """The AES-256-GCM key of the shares between devices a and b (both directions)."""
    return hkdf(shared_secret(private, peer), domain, pair_info(SHARE_LABEL, a, b))


def aad(domain: bytes, sender: int, receiver: int) -> bytes:
    return domain + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")


def share_plaintext(sender: int, receiver: int, seed_share: bytes, key_share: bytes) -> bytes:
    return sender.to_bytes(4, "big") + receiver.to_bytes(4, "big") + seed_share + key_share


def encrypt_share(key: bytes, domain: bytes, sender: int, receiver: int, seed_share: bytes,
                  key_share: bytes, nonce: bytes) -> bytes:
    """nonce ‖ AES-256-GCM ciphertext ‖ tag: CIPHERTEXT_BYTES bytes."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    plaintext = share_plaintext(sender, receiver, seed_share, key_share)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad(domain, sender, receiver))


def decrypt_share(key: bytes, domain: bytes, sender: int, receiver: int, blob: bytes) -> bytes:
    """The plaintext of a share sent by `sender` to `receiver` (InvalidTag if it does not verify)."""
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad(domain, sender, receiver))


_scratch = threading.local()


def keystream(key: bytes, count: int) -> np.ndarray:
    """`count` uint32 words of the AES-256-CTR keystream under `key`, in this thread's scratch
    buffer (valid until the thread's next call; a key is used for one stream only)."""
    nbytes = 4 * count
    if getattr(_scratch, "size", -1) != nbytes:
        _scratch.zeros, _scratch.out, _scratch.size = bytes(nbytes), bytearray(nbytes + 16), nbytes
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(_scratch.zeros, _scratch.out)
    return np.frombuffer(_scratch.out, "<u4", count=count)


def add_mask(total: np.ndarray, key: bytes, sign: int) -> None:
    """total (uint32) += sign · mask(key), modulo 2^32, without keeping the mask."""
    stream = keystream(key, len(total))
    if sign > 0:
        total += stream
    else:
        total -= stream
