"""All server state that is not a file: one database, SQLite (the embedded default) or PostgreSQL.

* `base`     — `Store` (thread-local connections, nested transactions, commit
  hooks) and the `Tx` / `Row` protocol every service types its transactions with;
* `sqlite`   — the embedded backend (a file, WAL, flock'd writers);
* `postgres` — several replicas on one PostgreSQL database (advisory locks).

`open_store(database)` picks the backend from the config's `database`.
"""
from __future__ import annotations

from pathlib import Path

from server.store.base import Row, Store, Tx

__all__ = ["Row", "Store", "Tx", "is_postgres_url", "open_store"]


def is_postgres_url(database: str | Path) -> bool:
    return str(database).startswith(("postgresql://", "postgres://"))


def open_store(database: str | Path, fsync: bool = False) -> Store:
    """The store a config's `database` names: a PostgreSQL URL, or a SQLite file path."""
    if is_postgres_url(database):
        from server.store.postgres import PostgresStore
        return PostgresStore(str(database), fsync=fsync)
    from server.store.sqlite import SqliteStore
    return SqliteStore(database, fsync=fsync)
