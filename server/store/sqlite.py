"""The embedded SQLite backend of server.store (the default): one database file, WAL, one writer at a time.

stdlib sqlite3 in WAL mode; the write lock is `BEGIN IMMEDIATE`, queued on an
`flock` first. `synchronous=NORMAL` survives a killed process; `fsync=True`
selects `FULL` for power loss. The schema version is `PRAGMA user_version`.
The database file is created mode 0600 (SQLite gives its -wal and -shm files
the same mode), and so are the lock files.
Shard leases (server.partials) are `flock`s on local files.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from server.keys import private_file
from server.store.base import Store


class FileLocks:
    """Shard leases as `flock`s on `<root>/<round>/<shard>.lock` (released by the kernel if the holder dies)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def acquire(self, round_id: int, shard: int, blocking: bool):
        directory = self.root / str(round_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def release(self, handle) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


class SqliteStore(Store):
    """Thread-local SQLite connections to one database file, migrated on open."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, fsync: bool = False, busy_timeout_s: float = 30.0):
        super().__init__()
        self.path = private_file(path)     # mode 0600 before SQLite opens it: the -wal and -shm files follow
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._busy_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._migrate(lambda c: c.execute("PRAGMA user_version").fetchone()[0],
                      lambda c, v: c.execute(f"PRAGMA user_version={v}"), lambda s: s)

    def shard_locks(self, partials_root: Path) -> FileLocks:
        return FileLocks(partials_root)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_ms / 1000)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        return conn

    def _begin(self, conn, write: bool) -> None:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def tables(self) -> list[str]:
        return [r[0] for r in self.connection().execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]

    @contextlib.contextmanager
    def _writer_queue(self) -> Iterator[None]:
        """Writers queue on a thread lock and an `flock` on `<database>.lock` before asking SQLite:
        a writer that finds the database locked would otherwise sleep in SQLite's busy handler
        (1, 2, 5, 10, ... ms) and wake up long after the lock is free; the kernel wakes an flock
        waiter at once."""
        with self._write_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
