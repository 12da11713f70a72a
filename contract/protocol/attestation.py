"""Device attestation: the statement an attestation service signs, and how a server checks it.

A phone proves it is a genuine install of the app on an unmodified device by
asking the platform's attestation service (Play Integrity, App Attest) for a
verdict bound to a fresh server nonce, and sending the signed verdict when it
enrolls. Nightjar's stand-in for those services signs an `AttestationStatement`
with an Ed25519 key (`sign`, used by the emulator and by a development issuer
that `python -m server init` creates); the server's default verifier checks
the signature against the configured issuer public key and that the statement
names this population and the nonce the server handed out (`verify`).

The statement is canonical JSON (sorted keys, no spaces: PROTOCOL.md, "Canonical JSON"),
base64url-encoded without padding on the wire, and the signature is over exactly
those bytes. The server verifies the signature over the bytes as sent and then
reads them as any JSON object with exactly the statement's fields, each of its
type (`STATEMENT`): anything else is 401 bad_attestation.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from contract.protocol import schema as s
from contract.protocol.errors import ErrorCode, ProtocolError

GENUINE = "MEETS_DEVICE_INTEGRITY"      # the verdict a genuine device gets (Play Integrity's name)
STATEMENT_VERSION = 1


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_ATTESTATION, f"{what} is not base64url") from None


@dataclasses.dataclass(frozen=True)
class AttestationStatement:
    population: str
    nonce: str              # the server's nonce, as it was handed out
    verdict: str            # GENUINE for a device that passes
    app_id: str             # the app that asked (e.g. "com.example.keyboard")
    issued_at: float        # the issuer's clock (Unix s)
    version: int = STATEMENT_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AttestationStatement":
        """The statement in `data` (any JSON object with exactly these fields, of these types: a signer's
        key order and spacing do not matter, the signature covers the bytes as sent)."""
        try:
            statement = cls(**STATEMENT.parse(json.loads(data), "attestation.statement"))
        except (ValueError, TypeError, ProtocolError):
            raise ProtocolError(ErrorCode.BAD_ATTESTATION, "the attestation statement is not a "
                                "statement this server reads") from None
        if statement.version != STATEMENT_VERSION:
            raise ProtocolError(ErrorCode.BAD_ATTESTATION, f"attestation statement version "
                                f"{statement.version!r} is not {STATEMENT_VERSION}")
        return statement


@dataclasses.dataclass(frozen=True)
class Attestation:
    """What a device sends: the statement's bytes and the issuer's signature, both base64url."""

    statement: str
    signature: str

    def to_json(self) -> dict:
        return {"statement": self.statement, "signature": self.signature}


STATEMENT = s.Obj("AttestationStatement", [
    s.Field("population", s.Str(64)), s.Field("nonce", s.Str(256)), s.Field("verdict", s.Str(256)),
    s.Field("app_id", s.Str(256)), s.Field("issued_at", s.Num(0)), s.Field("version", s.Int(0))])


def sign(statement: AttestationStatement, key: Ed25519PrivateKey) -> Attestation:
    """The issuer's side: sign a statement (what the attestation service does for the phone)."""
    data = statement.to_bytes()
    return Attestation(b64encode(data), b64encode(key.sign(data)))


def verify(attestation: Attestation, issuer: Ed25519PublicKey) -> AttestationStatement:
    """The statement, if `issuer` signed exactly these bytes; ProtocolError(bad_attestation) if not."""
    data = b64decode(attestation.statement, "attestation.statement")
    signature = b64decode(attestation.signature, "attestation.signature")
    try:
        issuer.verify(signature, data)
    except InvalidSignature:
        raise ProtocolError(ErrorCode.BAD_ATTESTATION, "the attestation's signature is not the "
                            "issuer's") from None
    return AttestationStatement.from_bytes(data)


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """An issuer public key as configured: the 32 raw bytes, base64url. ValueError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not an Ed25519 public key (32 bytes, base64url): {e}") from None


def public_key_text(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
