"""The PostgreSQL backend of server.store: the same guarantees, for several replicas on one database.

Selected by `database = "postgresql://user@host:port/dbname"` in the config. psycopg 3
(pinned in requirements.txt); one autocommit connection per thread, with
explicit BEGIN/COMMIT so that nesting and commit hooks behave as with SQLite.

* **The write lock** is `pg_advisory_xact_lock(WRITE_LOCK)`, the first statement
  of every write transaction (READ COMMITTED): writers on every replica run one
  at a time and each sees everything committed before it, which is exactly the
  serial order SQLite's `BEGIN IMMEDIATE` gives. It is released by COMMIT,
  ROLLBACK, or the server when a killed replica's connection drops. Round
  transitions are decided under it, so each happens once, whichever replica
  sees it first; there is no favoured replica and no timer.
* **Reads** that need a snapshot run in REPEATABLE READ.
* **Durability** follows the config's `fsync`, as with SQLite: off, a commit
  survives a killed process but not a power loss (`synchronous_commit = off`);
  on, every commit waits for the WAL to reach the disk.
* **Shard leases** (server.partials) are session advisory locks on the two-key
  space (round id, shard), which never meets WRITE_LOCK's one-key space.
* **SQL** is written once in SQLite's dialect; `?` placeholders become `%s`
  here, and migrations go through server.schema.postgres_ddl. SUM() of integers,
  NUMERIC in PostgreSQL, comes back as an int (a float if it has a fraction),
  as SQLite returns it.
"""
from __future__ import annotations

import functools
import re
from decimal import Decimal

import psycopg
from psycopg.adapt import Loader

from server.schema import postgres_ddl
from server.store.base import Store

WRITE_LOCK = 0x4E69676874   # "Night": the one key of the database-wide write lock


class Row(tuple):
    """A result row indexable by position and by column name, like sqlite3.Row."""

    __slots__ = ()
    _names: dict[str, int] = {}

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@functools.lru_cache(maxsize=64)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_names": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor):
    result = cursor.pgresult          # its field names directly: cursor.description builds objects per call
    if result is None or not result.nfields:
        return tuple
    return _row_class(tuple(result.fname(i).decode() for i in range(result.nfields)))


class _Numeric(Loader):
    def load(self, data) -> int | float:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


_QUOTED = re.compile(r"('(?:[^']|'')*')")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite-dialect SQL with parameters as psycopg's: every literal `%` → `%%` (psycopg reads them
    even inside quotes), and `?` → `%s` outside quoted strings."""
    parts = _QUOTED.split(sql)
    for i in range(len(parts)):
        parts[i] = parts[i].replace("%", "%%") if i % 2 else parts[i].replace("%", "%%").replace("?", "%s")
    return "".join(parts)


class Connection:
    """What the services call on a connection (`execute`, `executemany`, `in_transaction`), on psycopg."""

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, sql: str, params=()) -> psycopg.Cursor:
        if not params:           # no parameters: psycopg reads the text as it is
            return self.raw.execute(sql)
        return self.raw.execute(translate(sql), tuple(params))

    def executemany(self, sql: str, rows) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), [tuple(r) for r in rows])
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


class AdvisoryLocks:
    """Shard leases held by this thread's connection; released by the server if the replica dies."""

    def __init__(self, store: "PostgresStore"):
        self._store = store

    def acquire(self, round_id: int, shard: int, blocking: bool):
        conn = self._store.connection()
        if blocking:
            conn.execute("SELECT pg_advisory_lock(?, ?)", (round_id, shard))
            return (round_id, shard)
        got = conn.execute("SELECT pg_try_advisory_lock(?, ?)", (round_id, shard)).fetchone()[0]
        return (round_id, shard) if got else None

    def release(self, handle) -> None:
        self._store.connection().execute("SELECT pg_advisory_unlock(?, ?)", handle)


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(self, url: str, fsync: bool = False, connect_timeout_s: float = 10.0):
        super().__init__()
        self.url = url
        self._fsync = fsync
        self._timeout = connect_timeout_s
        self._migrate(self._version, self._set_version, postgres_ddl)

    def shard_locks(self, partials_root) -> AdvisoryLocks:
        return AdvisoryLocks(self)

    def _connect(self) -> Connection:
        raw = psycopg.connect(self.url, autocommit=True, row_factory=_row_factory,
                              connect_timeout=max(1, int(self._timeout)))
        raw.adapters.register_loader("numeric", _Numeric)
        if not self._fsync:      # as SQLite's synchronous=NORMAL: survives a killed process, not power loss
            raw.execute("SET synchronous_commit TO off")
        return Connection(raw)

    def _begin(self, conn: Connection, write: bool) -> None:
        if write:                # one round trip: both statements in one simple query
            conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        else:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")

    def tables(self) -> list[str]:
        return [r[0] for r in self.connection().execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename != 'schema_version'"
            " ORDER BY tablename")]

    def _broken(self, conn: Connection) -> bool:
        return conn.raw.closed or conn.raw.broken

    @staticmethod
    def _version(conn: Connection) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            return 0
        return row[0]

    @staticmethod
    def _set_version(conn: Connection, version: int) -> None:
        conn.execute("UPDATE schema_version SET version = ?", (version,))
