"""How a phone becomes a device of a population: the app credential and an attestation.

The app ships with its population's credential. At enrollment the runtime
asks the server for a nonce, has the platform's attestation service sign a
statement naming the population and that nonce (`Attester`: on a phone,
Play Integrity or App Attest), and registers with both
(`ServerClient.register`). The statement never leaves the device except in
that one request, and it holds no typed text.

`KeyAttester` is the development stand-in for the platform's service: it
signs with the development issuer key that `python -m server init` writes
(or any Ed25519 key whose public half the server is configured with). The
fleet emulator gives every phone one.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.protocol.attestation import GENUINE, Attestation, AttestationStatement, b64decode, sign


class Attester(Protocol):
    def attest(self, population: str, nonce: str) -> Attestation: ...


class KeyAttester:
    """Signs genuine-device statements with an Ed25519 issuer key (development and emulation)."""

    def __init__(self, private_key: Ed25519PrivateKey, app_id: str = "nightjar.keyboard",
                 now: Callable[[], float] = time.time):
        self._key, self._app_id, self._now = private_key, app_id, now

    @classmethod
    def from_text(cls, raw_b64: str, **kwargs) -> "KeyAttester":
        return cls(Ed25519PrivateKey.from_private_bytes(b64decode(raw_b64, "issuer private key")), **kwargs)

    def attest(self, population: str, nonce: str) -> Attestation:
        return sign(AttestationStatement(population, nonce, GENUINE, self._app_id, self._now()), self._key)


@dataclasses.dataclass(frozen=True)
class Enrollment:
    """What a device needs to register: its app's credential and an attestation service."""

    app_credential: str
    attester: Attester

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Enrollment":
        """From the enrollment file `python -m server init` writes (development only: it holds the
        issuer's private key, which on a real phone is the platform's)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["app_credential"], KeyAttester.from_text(data["issuer_private_key"], **kwargs))
