"""What every backend of server.store guarantees, and the small protocol services type their transactions with.

* One connection per thread (gunicorn's gthread workers reuse threads, so a
  connection lives as long as its thread); never shared across a fork.
* Every state change runs in `store.write()`, a transaction that first takes
  the database's single write lock, so two writers (threads, worker processes
  or replicas on other hosts) can never both decide from the same stale read,
  and a process killed halfway leaves its transaction rolled back. Round
  transitions are therefore exactly-once whichever process sees them first.
* `store.read()` is a consistent snapshot for several reads.
* `store.on_commit(fn)` runs `fn` after the outermost COMMIT, never after a rollback.
* `store.shard_locks(root)` leases a round's partial-sum shard (server.partials)
  across processes.

Services never see a backend's connection type: they are written against `Tx`
(what `write()`, `read()` and `connection()` hand out) and the `Row`s it
returns, SQL in SQLite's dialect (server.store.postgres translates it).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from server.schema import MIGRATIONS, statements


class Row(Protocol):
    """A result row, indexable by column name and by position (sqlite3.Row and the PostgreSQL backend's)."""

    def __getitem__(self, key: str | int) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Tx(Protocol):
    """A connection inside (or outside) a transaction: what every service method takes."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor: ...


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
    def connection(self) -> Tx:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.depth, self._local.pid = conn, 0, os.getpid()
            self._local.on_commit = []
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction (nested calls join the outer one)."""
        if getattr(self._local, "depth", 0):
            with self._transaction(write=True) as conn:
                yield conn
            return
        with self._writer_queue(), self._transaction(write=True) as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        """A consistent snapshot for several reads."""
        with self._transaction(write=False) as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
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
