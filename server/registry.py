"""Devices and their credentials (the `devices` table's one owner).

A device enrolls once (server.enrollment checks it may) and gets an id and a
random 256-bit secret; it sends `Authorization: Bearer <device_id>:<secret>`
on every later call. Only the secret's SHA-256 is stored: the secret is
random and long, so a fast hash is enough to make a leaked database useless
for impersonation (a slow password KDF protects low-entropy secrets, which
these are not). A device belongs to the population it enrolled in, is named
in operator views only by its pseudonym (a keyed hash of its id), and may be
revoked: a revoked device's every call is refused with 403.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

from contract.protocol.wire import Registration
from contract.clock import Clock
from server.errors import ErrorCode, ProtocolError
from server.keys import Pseudonyms
from server.store import Store


@dataclasses.dataclass(frozen=True)
class Device:
    id: str
    population: str | None
    registered_at: float
    last_participation_at: float | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class DeviceRegistry:
    def __init__(self, store: Store, clock: Clock, pseudonyms: Pseudonyms):
        self._store = store
        self._clock = clock
        self.pseudonym = pseudonyms

    def register(self, population: str) -> Registration:
        """A new device of `population` (callers have checked it may enroll)."""
        device_id = "d-" + secrets.token_hex(12)
        secret = secrets.token_urlsafe(32)
        with self._store.write() as conn:
            conn.execute("INSERT INTO devices (id, secret_sha256, registered_at, population, pseudonym)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (device_id, _digest(secret), self._clock.now(), population, self.pseudonym(device_id)))
        return Registration(device_id, secret)

    def authenticate(self, authorization: str | None) -> Device:
        """The device named by an `Authorization` header: 401 if unknown, 403 if revoked."""
        if not authorization:
            raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                "missing Authorization header (Bearer <device_id>:<secret>)")
        scheme, _, credentials = authorization.partition(" ")
        device_id, sep, secret = credentials.strip().partition(":")
        if scheme.lower() != "bearer" or not sep or not device_id or not secret:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Authorization must be 'Bearer <device_id>:<secret>'")
        row = self._store.connection().execute(
            "SELECT id, secret_sha256, registered_at, last_participation_at, population, revoked_at"
            " FROM devices WHERE id = ?", (device_id[:64],)).fetchone()
        if row is None or not hmac.compare_digest(row["secret_sha256"], _digest(secret)):
            raise ProtocolError(ErrorCode.UNKNOWN_DEVICE, "unknown device or wrong secret")
        if row["revoked_at"] is not None:
            raise ProtocolError(ErrorCode.DEVICE_REVOKED, "this device was revoked by the operator")
        return Device(row["id"], row["population"], row["registered_at"], row["last_participation_at"])

    def find(self, population: str, pseudonym: str) -> str:
        """The id of the device an operator names by its pseudonym; 404 if none."""
        row = self._store.connection().execute(
            "SELECT id FROM devices WHERE pseudonym = ? AND population = ?", (pseudonym[:40], population)).fetchone()
        if row is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {pseudonym[:40]!r} in population {population!r}")
        return row["id"]

    def mark_revoked(self, tx, device_id: str) -> bool:
        """Revoke (inside the caller's transaction); False if it already was."""
        return tx.execute("UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                          (self._clock.now(), device_id)).rowcount == 1

    def record_participation(self, tx, device_id: str, now: float) -> None:
        tx.execute("UPDATE devices SET last_participation_at = ? WHERE id = ?", (now, device_id))

    def count(self, population: str | None = None) -> int:
        conn = self._store.connection()
        if population is None:
            return conn.execute("SELECT COUNT(*) FROM devices WHERE revoked_at IS NULL").fetchone()[0]
        return conn.execute("SELECT COUNT(*) FROM devices WHERE population = ? AND revoked_at IS NULL",
                            (population,)).fetchone()[0]
