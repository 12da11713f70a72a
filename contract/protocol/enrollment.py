"""Enrollment's messages: how a device gets its credentials for a population (re-exported by wire).

A device asks for a nonce (`NONCE_REQUEST` → `Nonce`), has its platform's
attestation service sign a statement naming the population and the nonce
(contract.protocol.attestation), and sends it with the app's credential
(`REGISTRATION_REQUEST` → `Registration`). Every string it sends is a
bounded pattern: a population's name, base64url, token characters.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from contract.protocol import schema as s

POPULATION = s.Str(64, r"[A-Za-z0-9_-]+", "a configured population's name")
B64 = s.Str(4096, r"[A-Za-z0-9_-]*", "base64url, no padding")
NONCE_REQUEST = s.Obj("NonceRequest", [s.Field("population", POPULATION)])


@dataclasses.dataclass(frozen=True)
class Nonce:
    """A fresh, single-use value the device's attestation must be bound to."""

    nonce: str
    expires_at: float           # the server's clock
    expires_in_s: float

    SCHEMA = s.Obj("Nonce", [s.Field("nonce", s.Str(64)), s.Field("expires_at", s.Num(0)),
                             s.Field("expires_in_s", s.Num(0))],
                   description="ask the attestation service for a statement naming this nonce; enroll "
                               "before it expires; it works once")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> "Nonce":
        return cls(**cls.SCHEMA.parse(value, "nonce"))


REGISTRATION_REQUEST = s.Obj("RegistrationRequest", [
    s.Field("population", POPULATION),
    s.Field("app_credential", s.Str(256, r"[A-Za-z0-9._~+/=-]{1,256}", description=(
        "the population's app credential (ships with the app): token characters only; compared by "
        "SHA-256 with the configured one and never stored"))),
    s.Field("attestation", s.Obj("Attestation", [
        s.Field("statement", B64), s.Field("signature", B64)],
        description="contract.protocol.attestation: the issuer-signed statement naming the population and a "
                    "nonce from POST /v1/enrollment/nonces")),
])


@dataclasses.dataclass(frozen=True)
class Registration:
    device_id: str
    secret: str

    SCHEMA = s.Obj("Registration", [s.Field("device_id", s.Str(64)), s.Field("secret", s.Str(128)),
                                    s.Field("authorization", s.Str(200), required=False)],
                   description="send 'Authorization: Bearer <device_id>:<secret>' (the `authorization` "
                               "value) on every later call")

    @property
    def authorization(self) -> str:
        return f"Bearer {self.device_id}:{self.secret}"

    def to_json(self) -> dict:
        return {"device_id": self.device_id, "secret": self.secret, "authorization": self.authorization}

    @classmethod
    def from_json(cls, value: Any) -> "Registration":
        fields = cls.SCHEMA.parse(value, "registration")
        return cls(fields["device_id"], fields["secret"])
