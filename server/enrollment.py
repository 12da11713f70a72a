"""Who may become a device: an app credential, an attestation bound to a fresh nonce, a verifier.

Enrollment, in two calls (federated-compute sends an attestation measurement
bound to the population at check-in; Google's FL system admits only devices
that pass SafetyNet / Play Integrity):

1. `POST /v1/enrollment/nonces {population}` → a nonce: 32 random bytes from
   the OS CSPRNG, good for `nonce_ttl_s`, once. Only its hash is stored.
2. The phone asks its platform's attestation service for a statement naming
   the population and the nonce (contract.protocol.attestation), then
   `POST /v1/devices {population, app_credential, attestation}`. The server
   checks the app credential (against its configured sha256), has the
   population's verifier check the statement (default: an Ed25519 signature
   by the configured issuer, the verdict, the app id), and consumes the nonce
   in the same transaction that registers the device — a statement cannot be
   replayed, nor used for another population.

An operator can revoke a device (`revoke`): its later calls are refused with
403, and its open sessions end at once so a round it was in carries on
without it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Protocol

from contract.protocol.attestation import GENUINE, Attestation, AttestationStatement, public_key_from_text, verify
from contract.protocol.wire import Nonce, Registration
from contract.clock import Clock
from server.config import ServerConfig
from server.errors import ErrorCode, ProtocolError
from server.keys import credential_digest, enrollment_material
from server.registry import DeviceRegistry
from server.store import Store


class Verifier(Protocol):
    """Checks an attestation (stands in for Play Integrity / App Attest verdict checks)."""

    def verify(self, attestation: Attestation) -> AttestationStatement: ...


class Ed25519Verifier:
    """A statement signed by the configured issuer, with a genuine verdict, for the configured app."""

    def __init__(self, issuer_public_key: str, app_id: str | None = None):
        self._key = public_key_from_text(issuer_public_key)
        self._app_id = app_id

    def verify(self, attestation: Attestation) -> AttestationStatement:
        statement = verify(attestation, self._key)
        if statement.verdict != GENUINE:
            raise ProtocolError(ErrorCode.BAD_ATTESTATION, f"the device's verdict is {statement.verdict!r}")
        if self._app_id is not None and statement.app_id != self._app_id:
            raise ProtocolError(ErrorCode.BAD_ATTESTATION, "the statement was issued to another app")
        return statement


VERIFIERS = {"ed25519": Ed25519Verifier}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class EnrollmentService:
    def __init__(self, store: Store, clock: Clock, config: ServerConfig, registry: DeviceRegistry,
                 end_sessions):
        self._store, self._clock, self._config, self._registry = store, clock, config, registry
        self._end_sessions = end_sessions          # (tx, device_id) → None: the reporting service's
        self._checks: dict[str, tuple[str, Verifier]] = {}

    def _population(self, population: str) -> tuple[str, Verifier]:
        """The population's credential digest and verifier (from the config, else `server init`'s file)."""
        if population not in self._config.populations:
            raise ProtocolError(ErrorCode.UNKNOWN_POPULATION, f"no population named {population!r}")
        if population not in self._checks:
            settings = self._config.population(population).enrollment
            credential, key = settings.app_credential_sha256, settings.issuer_public_key
            path = self._config.enrollment_path(population)
            if (credential is None or key is None) and path.is_file():
                material = enrollment_material(path)
                credential = credential or credential_digest(material["app_credential"])
                key = key or material["issuer_public_key"]
            if credential is None or key is None:
                raise ProtocolError(ErrorCode.BAD_CREDENTIAL, f"enrollment in {population!r} is not set up "
                                    "(run `python -m server init`)")
            self._checks[population] = (credential, VERIFIERS[settings.verifier](key, settings.app_id))
        return self._checks[population]

    def issue_nonce(self, population: str) -> Nonce:
        self._population(population)
        ttl = self._config.population(population).enrollment.nonce_ttl_s
        nonce, now = secrets.token_urlsafe(32), self._clock.now()
        with self._store.write() as tx:
            tx.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
            tx.execute("INSERT INTO nonces (nonce_sha256, population, expires_at) VALUES (?, ?, ?)",
                       (_sha256(nonce), population, now + ttl))
        return Nonce(nonce, now + ttl, ttl)

    def enroll(self, population: str, app_credential: str, attestation: Attestation) -> Registration:
        """Register a device of `population` if its credential, attestation and nonce check out."""
        credential, verifier = self._population(population)
        if not hmac.compare_digest(credential_digest(app_credential), credential):
            raise ProtocolError(ErrorCode.BAD_CREDENTIAL, "the app credential is not this population's")
        statement = verifier.verify(attestation)
        if statement.population != population:
            raise ProtocolError(ErrorCode.BAD_ATTESTATION, "the attestation names another population")
        with self._store.write() as tx:
            used = tx.execute("DELETE FROM nonces WHERE nonce_sha256 = ? AND population = ? AND expires_at > ?",
                              (_sha256(statement.nonce), population, self._clock.now())).rowcount
            if not used:
                raise ProtocolError(ErrorCode.BAD_NONCE, "the attestation's nonce is unknown, used, expired "
                                    "or another population's: ask for a new one")
            return self._registry.register(population)

    def revoke(self, population: str, pseudonym: str) -> bool:
        """Revoke a device; its open sessions end now. False if it was already revoked."""
        device_id = self._registry.find(population, pseudonym)
        with self._store.write() as tx:
            changed = self._registry.mark_revoked(tx, device_id)
            self._end_sessions(tx, device_id)
        return changed
