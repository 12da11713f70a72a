"""The server's own secrets: files in its private state directory, created once, readable only by it.

* `operator_token` — what operator endpoints require (`Authorization: Bearer <token>`);
* `pseudonym.key` — the key of the keyed hash that names devices in operator views
  (`pseudonym(device_id)`), so an operator can tell devices apart and revoke one
  without ever seeing a device's id;
* `dp-ftrl.key` — DP-FTRL's noise key: each round's correlated noise is regenerated from it and
  the round's index (contract.dp.ftrl), so it is as secret as the noise;
* `enrollment-<population>.json` — the population's app credential and the
  development attestation issuer's key pair (contract.protocol.attestation), written by
  `python -m server init` when the config names none.

Every secret is 32 bytes from the OS CSPRNG (`secrets`), written with mode
0600 through O_EXCL, so two gunicorn workers creating it at once agree on one.

`secure_server_state(config)`, at every start (server.services, `server run`
before it forks), keeps the private state private: the state directory mode 0700,
and every file in it — keys, the rate-limit database, partial sums, private
artifacts — and the SQLite database with its -wal, -shm and lock files mode
0600. A wider mode is narrowed, with a warning naming the path and both modes;
where that is not possible (a file of another user), the server refuses to
start (`PrivateStateError`, naming the path).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)
SQLITE_SIDECARS = ("-wal", "-shm", "-journal", ".lock")


class PrivateStateError(ValueError):
    """A private file or directory whose mode is too wide and cannot be narrowed by this user."""


def private_file(path: Path) -> Path:
    """`path`, created empty with mode 0600 if it does not exist (before a library such as SQLite
    creates it with the umask's mode; SQLite gives the -wal and -shm files the database's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    return path


def _narrow(path: Path, most: int) -> None:
    """Take every permission bit beyond `most` off `path`: warn on success, refuse when impossible."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:         # replaced meanwhile (a partial sum, a temporary file)
        return
    if mode & ~most == 0:
        return
    try:
        os.chmod(path, mode & most)
    except PermissionError:
        raise PrivateStateError(f"{path} is mode {mode:04o} and this user (uid {os.getuid()}) cannot narrow it "
                                f"to {mode & most:04o}: it must be private to the server's user") from None
    log.warning("%s was mode %04o: narrowed to %04o (private server state)", path, mode, mode & most)


def secure_server_state(config) -> None:
    """`secure_state` for a server config (server.config.ServerConfig): its state directory, its database
    when that is a SQLite file (not a PostgreSQL URL) and its operator token file when it names one."""
    database = None if "://" in str(config.database) else Path(config.database)
    secure_state(config.state_dir, database, (config.operator_token_file,))


def secure_state(state_dir: Path, sqlite_database: Path | None = None,
                 extra_files: tuple[Path | None, ...] = ()) -> None:
    """The private state directory 0700 (created so if missing), the files in it, the SQLite database
    and its sidecar files, and `extra_files` (e.g. an operator token kept elsewhere) at most 0600."""
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(state_dir, 0o700)
    files = [Path(root, name) for root, _, names in os.walk(state_dir) for name in names]
    if sqlite_database is not None:
        files += [Path(f"{sqlite_database}{suffix}") for suffix in ("",) + SQLITE_SIDECARS]
    for path in files + [Path(p) for p in extra_files if p is not None]:
        if path.is_file() and not path.is_symlink():
            _narrow(path, 0o600)


def load_or_create(path: Path, make) -> str:
    """The secret in `path`, creating it with `make()` (atomically, mode 0600) if it does not exist."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):               # another process is writing it: wait for its content
            text = path.read_text(encoding="utf-8")
            if text:
                return text.strip()
            import time
            time.sleep(0.01)
        raise RuntimeError(f"{path} exists but stays empty")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        value = make()
        f.write(value + "\n")
    return value


def secret_key(path: Path) -> bytes:
    """32 secret bytes kept in `path` (hex): DP-FTRL's noise key (contract.dp.ftrl) — whoever holds it can
    subtract the noise, so it never leaves the private state directory."""
    return bytes.fromhex(load_or_create(path, lambda: secrets.token_hex(32)))


def operator_token(path: Path) -> str:
    return load_or_create(path, lambda: secrets.token_urlsafe(32))


class Pseudonyms:
    """`pseudonym(device_id)`: a stable, keyed name for a device ("p-" + 16 hex digits of HMAC-SHA256)."""

    def __init__(self, key_path: Path):
        self._key = bytes.fromhex(load_or_create(key_path, lambda: secrets.token_hex(32)))

    def __call__(self, device_id: str) -> str:
        return "p-" + hmac.new(self._key, device_id.encode(), hashlib.sha256).hexdigest()[:16]


def enrollment_material(path: Path) -> dict:
    """A population's app credential and development issuer keys (created on first use).

    {"app_credential": str, "issuer_private_key": base64url, "issuer_public_key": base64url}. The
    private key stands in for the attestation service's; a real deployment configures the
    service's public key instead and has no private key here.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from contract.protocol.attestation import b64encode, public_key_text

    def make() -> str:
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return json.dumps({"app_credential": secrets.token_urlsafe(24), "issuer_private_key": b64encode(raw),
                           "issuer_public_key": public_key_text(key.public_key())})

    return json.loads(load_or_create(path, make))


def credential_digest(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8")).hexdigest()
