"""Devices and their credentials.

A device registers once and gets an id and a random 256-bit secret; it sends
`Authorization: Bearer <device_id>:<secret>` on every later call. Only the
secret's SHA-256 is stored: the secret is random and long, so a fast hash is
enough to make a leaked database useless for impersonation (a slow password
KDF protects low-entropy secrets, which these are not).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

from server.clock import Clock
from server.errors import ErrorCode, ProtocolError
from server.store import Store


@dataclasses.dataclass(frozen=True)
class Registration:
    device_id: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Device:
    id: str
    registered_at: float
    last_participation_at: float | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class DeviceRegistry:
    def __init__(self, store: Store, clock: Clock):
        self._store = store
        self._clock = clock

    def register(self) -> Registration:
        device_id = "d-" + secrets.token_hex(12)
        secret = secrets.token_urlsafe(32)
        with self._store.write() as tx:
            tx.execute("INSERT INTO devices (id, secret_sha256, registered_at) VALUES (?, ?, ?)",
                       (device_id, _digest(secret), self._clock.now()))
        return Registration(device_id, secret)

    def authenticate(self, authorization: str | None) -> Device:
        """The device named by an `Authorization` header, or Unauthorized."""
        if not authorization:
            raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                "missing Authorization header (Bearer <device_id>:<secret>)")
        scheme, _, credentials = authorization.partition(" ")
        device_id, sep, secret = credentials.strip().partition(":")
        if scheme.lower() != "bearer" or not sep or not device_id or not secret:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "Authorization must be 'Bearer <device_id>:<secret>'")
        row = self._store.connection().execute(
            "SELECT id, secret_sha256, registered_at, last_participation_at FROM devices WHERE id = ?",
            (device_id,)).fetchone()
        if row is None or not hmac.compare_digest(row["secret_sha256"], _digest(secret)):
            raise ProtocolError(ErrorCode.UNKNOWN_DEVICE, "unknown device or wrong secret")
        return Device(row["id"], row["registered_at"], row["last_participation_at"])

    def count(self) -> int:
        return self._store.connection().execute("SELECT COUNT(*) FROM devices").fetchone()[0]
