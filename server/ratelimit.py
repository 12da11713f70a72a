"""Rate limits per device and per source address: token buckets shared by every worker process.

Each limit is a bucket of `burst` tokens refilled at `burst / per_s` tokens
a second; a request takes one token, and a request that finds the bucket
empty is refused with 429 and a Retry-After of the seconds until a token is
back. The buckets live in a SQLite file of their own beside the server's
private state (not in the main database, so a flood of refused requests never
queues behind round transitions), shared by the gunicorn workers; losing it
in a crash only forgets who was throttled. Time is the server's clock, so an
emulated fleet on a simulated clock is throttled in simulated time.

The defaults (server.config.RateLimits) are a multiple of what an honest phone
does in a night — it registers once, checks in a few times an hour, uploads
and downloads a few times — so they never slow one; an address is allowed
more than a device, because many phones share one address behind a carrier's
NAT.
"""
from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from pathlib import Path

from contract.clock import Clock
from server.errors import ErrorCode, ProtocolError


class RateLimited(ProtocolError):
    """429, with the seconds after which the request may succeed."""

    def __init__(self, what: str, retry_after_s: float):
        super().__init__(ErrorCode.RATE_LIMITED, f"too many {what}; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class RateLimiter:
    def __init__(self, path: Path, clock: Clock, store=None):
        """`store`: with PostgreSQL (several replicas) the buckets are the shared database's
        `rate_buckets` table, taken from with one atomic statement per request."""
        self._path = Path(path)
        self._clock = clock
        self._local = threading.local()
        self._shared = store if store is not None and store.dialect == "postgresql" else None
        if self._shared is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL,"
                         " updated_at REAL NOT NULL)")

    @contextlib.contextmanager
    def _connect(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")   # throttling state may be lost in a crash
            self._local.conn = conn
        yield conn

    def take(self, key: str, limit: tuple[float, float], what: str) -> None:
        """Take a token from bucket `key` (`limit` = (burst, per seconds)); RateLimited if empty."""
        burst, per_s = limit
        if burst <= 0:
            return                                  # a limit of 0 turns it off
        rate = burst / per_s
        now = self._clock.now()
        if self._shared is not None:
            return self._take_shared(key, burst, rate, now, what)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT tokens, updated_at FROM buckets WHERE key = ?", (key,)).fetchone()
                tokens = burst if row is None else min(burst, row[0] + max(0.0, now - row[1]) * rate)
                if tokens < 1.0:
                    conn.execute("COMMIT")
                    raise RateLimited(what, math.ceil((1.0 - tokens) / rate))
                conn.execute("INSERT INTO buckets (key, tokens, updated_at) VALUES (?, ?, ?) ON CONFLICT(key)"
                             " DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
                             (key, tokens - 1.0, now))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _take_shared(self, key: str, burst: float, rate: float, now: float, what: str) -> None:
        """One statement under the bucket's row lock (never the database-wide write lock: a flood of
        refused requests must not queue behind round transitions): refill, take a token if there is
        one, and say whether it did."""
        refill = "LEAST(?, b.tokens + GREATEST(0, ? - b.updated_at) * ?)"
        row = self._shared.connection().execute(
            "INSERT INTO rate_buckets AS b (key, tokens, updated_at, taken) VALUES (?, ?, ?, 1)"
            f" ON CONFLICT (key) DO UPDATE SET tokens = CASE WHEN {refill} >= 1 THEN {refill} - 1 ELSE {refill} END,"
            f" taken = CASE WHEN {refill} >= 1 THEN 1 ELSE 0 END, updated_at = GREATEST(b.updated_at, ?)"
            " RETURNING tokens, taken",
            (key, burst - 1.0, now, *(burst, now, rate) * 4, now)).fetchone()
        if not row["taken"]:
            raise RateLimited(what, math.ceil((1.0 - row["tokens"]) / rate))
