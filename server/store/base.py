"""All server state that is not a file: one database, SQLite (the embedded default) or PostgreSQL.

What every backend guarantees (the services are written against this, not a dialect):
* One connection per thread (gunicorn's gthread workers reuse threads, so a
  connection lives as long as its thread); never shared across a fork.
* Every state change runs in `store.write()`, a transaction that first takes
  the database's single write lock, so two writers (threads, worker processes
  or replicas on other hosts) can never both decide from the same stale read,
  and a process killed halfway leaves its transaction rolled back. Round
  transitions are therefore exactly-once whichever process sees them first.
* `store.read()` is a consistent snapshot for several reads.
* `store.on_commit(fn)` runs `fn` after the outermost COMMIT, never after a rollback.
* `store.locks` leases a round's partial-sum shard (server.partials) across
  processes: `flock` on local files for SQLite, advisory locks for PostgreSQL.

SQLite (this module): stdlib sqlite3 in WAL mode; the write lock is `BEGIN
IMMEDIATE`, queued on an `flock` first. `synchronous=NORMAL` survives a killed
process; `fsync=True` selects `FULL` for power loss. The schema version is
`PRAGMA user_version`. PostgreSQL: server.store_pg.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from server.schema import MIGRATIONS, statements

class Store:
    """Thread-local connections, nested transactions and commit hooks; a backend supplies the rest."""

    dialect = "base"

    def __init__(self) -> None:
        self._local = threading.local()

    # --- what a backend implements ---
    def _connect(self):
        raise NotImplementedError

    def _begin(self, conn, write: bool) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _writer_queue(self) -> Iterator[None]:
        yield

    def _broken(self, conn) -> bool:
        return False

    # --- shared ---
    def connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.depth, self._local.pid = conn, 0, os.getpid()
            self._local.on_commit = []
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator:
        """A write transaction (nested calls join the outer one)."""
        if getattr(self._local, "depth", 0):
            with self._transaction(write=True) as conn:
                yield conn
            return
        with self._writer_queue(), self._transaction(write=True) as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator:
        """A consistent snapshot for several reads."""
        with self._transaction(write=False) as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator:
        conn = self.connection()
        if self._local.depth:
            if write and not self._local.writing:
                raise RuntimeError("a write transaction cannot start inside a read snapshot")
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        self._begin(conn, write)
        self._local.depth, self._local.writing, self._local.on_commit = 1, write, []
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if self._broken(conn):
                self._local.conn = None          # the next call reconnects
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0
            pending, self._local.on_commit = self._local.on_commit, []
        for fn in pending:          # only reached after COMMIT
            fn()

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` once this thread's transaction commits (never if it rolls back; now if none is open).

        Metrics and round-transition logs are emitted this way, so they count
        exactly what the database recorded.
        """
        if getattr(self._local, "depth", 0):
            self._local.on_commit.append(fn)
        else:
            fn()

    def tables(self) -> list[str]:
        """The schema's table names (backend bookkeeping excluded)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close this thread's connection (other threads' close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self, version: Callable, set_version: Callable, ddl: Callable[[str], str]) -> None:
        with self.write() as conn:
            for i in range(version(conn), len(MIGRATIONS)):
                for statement in statements(MIGRATIONS[i]):
                    conn.execute(ddl(statement))
                set_version(conn, i + 1)


class FileLocks:
    """Shard leases as `flock`s on `<root>/<round>/<shard>.lock` (released by the kernel if the holder dies)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def acquire(self, round_id: int, shard: int, blocking: bool):
        directory = self.root / str(round_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
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
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._busy_ms = int(busy_timeout_s * 1000)
        self._write_lock = threading.Lock()
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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


def is_postgres_url(database: str | Path) -> bool:
    return str(database).startswith(("postgresql://", "postgres://"))


def open_store(database: str | Path, fsync: bool = False) -> Store:
    """The store a config's `database` names: a PostgreSQL URL, or a SQLite file path."""
    if is_postgres_url(database):
        from server.store_pg import PostgresStore
        return PostgresStore(str(database), fsync=fsync)
    return SqliteStore(database, fsync=fsync)
