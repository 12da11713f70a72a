"""All server state that is not a file: one SQLite database (stdlib sqlite3, WAL mode).

Why SQLite and how it is used:
* One connection per thread (gunicorn's gthread workers reuse threads, so a
  connection lives as long as its thread); never shared across a fork.
* Every state change runs in `store.write()`, a `BEGIN IMMEDIATE` transaction:
  it takes the database's single write lock up front, so two workers (threads
  or processes) can never both decide from the same stale read, and a process
  killed halfway leaves the transaction rolled back by the WAL.
* `synchronous=NORMAL` in WAL mode survives a killed process (committed pages
  are in the OS cache); `fsync=True` in the config selects `FULL` for power loss.
* The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` brings a
  database from version i to i+1 and runs once, inside a transaction.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

MIGRATIONS: list[str] = [
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        registered_at REAL NOT NULL,
        last_participation_at REAL
    );
    CREATE TABLE populations (
        name TEXT PRIMARY KEY,
        layout_json TEXT NOT NULL,
        model_config_json TEXT,
        plan_json TEXT,
        vocab_sha256 TEXT,
        current_version INTEGER NOT NULL,
        published_version INTEGER,
        train_since_eval INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE versions (
        population TEXT NOT NULL REFERENCES populations(name),
        version INTEGER NOT NULL,
        parent INTEGER,
        round_number INTEGER,
        checkpoint_sha256 TEXT NOT NULL,
        optimizer_sha256 TEXT,
        created_at REAL NOT NULL,
        train_json TEXT NOT NULL DEFAULT '{}',
        eval_json TEXT,
        app_manifest_sha256 TEXT,
        published_at REAL,
        PRIMARY KEY (population, version)
    );
    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        population TEXT NOT NULL REFERENCES populations(name),
        number INTEGER NOT NULL,
        task TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        goal INTEGER NOT NULL,
        max_selected INTEGER NOT NULL,
        min_selected INTEGER NOT NULL,
        min_reports INTEGER NOT NULL,
        hyperparameters_json TEXT NOT NULL,
        opened_at REAL NOT NULL,
        selection_ends_at REAL NOT NULL,
        deadline REAL NOT NULL,
        selection_closed_at REAL,
        closed_at REAL,
        finalize_s REAL,
        selected INTEGER NOT NULL DEFAULT 0,
        reported INTEGER NOT NULL DEFAULT 0,
        aborted INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        weight_sum REAL NOT NULL DEFAULT 0,
        metric_sums_json TEXT NOT NULL DEFAULT '{}',
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        result_version INTEGER,
        UNIQUE (population, number)
    );
    CREATE TABLE partials (
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        shard INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        weight REAL NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (round_id, shard)
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        device_id TEXT NOT NULL REFERENCES devices(id),
        seed INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        assigned_at REAL NOT NULL,
        finished_at REAL,
        num_examples INTEGER,
        metrics_json TEXT,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        UNIQUE (round_id, device_id)
    );
    CREATE INDEX sessions_by_round ON sessions (round_id, state);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        population TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        claimed_at REAL,
        error TEXT,
        created_at REAL NOT NULL
    );
    """,
    # 2: each training round freezes its update spec (contract.update_spec.RoundSpec); running sums
    # are exact integers (contract.pipeline), so their weights are integers too.
    """
    ALTER TABLE rounds ADD COLUMN update_spec_json TEXT;
    """,
    # 3: enrollment (a device belongs to one population, has a pseudonym for operator views and may
    # be revoked), single-use nonces, and the artifacts anyone may download (published app models).
    """
    ALTER TABLE devices ADD COLUMN population TEXT;
    ALTER TABLE devices ADD COLUMN pseudonym TEXT;
    ALTER TABLE devices ADD COLUMN revoked_at REAL;
    CREATE INDEX devices_by_pseudonym ON devices (pseudonym);
    CREATE TABLE nonces (
        nonce_sha256 TEXT PRIMARY KEY,
        population TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE public_artifacts (
        sha256 TEXT PRIMARY KEY,
        population TEXT NOT NULL,
        version INTEGER NOT NULL
    );
    """,
    # 4: secure aggregation (server.secagg owns these): a round's phase, its devices' public keys
    # and places in the neighbour graph, the encrypted shares it relays, the shares revealed to it.
    """
    CREATE TABLE secagg_rounds (
        round_id INTEGER PRIMARY KEY REFERENCES rounds(id),
        phase TEXT NOT NULL,
        k INTEGER,
        t INTEGER,
        phase_ends_at REAL,
        members INTEGER NOT NULL DEFAULT 0,
        shared INTEGER NOT NULL DEFAULT 0,
        survivors INTEGER NOT NULL DEFAULT 0,
        reason TEXT
    );
    CREATE TABLE secagg_members (
        session_id TEXT PRIMARY KEY REFERENCES sessions(id),
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        node INTEGER,
        enc_pk BLOB NOT NULL,
        mask_pk BLOB NOT NULL,
        commitment BLOB NOT NULL,
        neighbours_json TEXT,
        state TEXT NOT NULL DEFAULT 'advertised',
        UNIQUE (round_id, node)
    );
    CREATE TABLE secagg_shares (
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        sender INTEGER NOT NULL,
        receiver INTEGER NOT NULL,
        ciphertext BLOB NOT NULL,
        PRIMARY KEY (round_id, receiver, sender)
    );
    CREATE TABLE secagg_reveals (
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        owner INTEGER NOT NULL,
        revealer INTEGER NOT NULL,
        kind TEXT NOT NULL,
        share BLOB NOT NULL,
        PRIMARY KEY (round_id, owner, revealer)
    );
    """,
    """
    CREATE TABLE discovery (
        population TEXT PRIMARY KEY REFERENCES populations(name),
        pass INTEGER NOT NULL DEFAULT 0,
        level INTEGER NOT NULL DEFAULT 0,
        frontier_json TEXT NOT NULL DEFAULT '[]',
        pass_words_json TEXT NOT NULL DEFAULT '{}',
        words_json TEXT NOT NULL DEFAULT '[]',
        train_since INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE discovery_votes (
        round_id INTEGER NOT NULL REFERENCES rounds(id),
        prefix TEXT NOT NULL,
        votes INTEGER NOT NULL,
        PRIMARY KEY (round_id, prefix)
    );
    ALTER TABLE versions ADD COLUMN vocab_sha256 TEXT;
    """,
    """
    CREATE TABLE dp_events (
        population TEXT NOT NULL REFERENCES populations(name),
        round_id INTEGER NOT NULL UNIQUE REFERENCES rounds(id),
        round_number INTEGER NOT NULL,
        version INTEGER,
        mechanism TEXT NOT NULL,
        noise_multiplier REAL NOT NULL,
        expected_reports INTEGER NOT NULL,
        population_size INTEGER NOT NULL,
        sampling_probability REAL NOT NULL,
        min_separation_s REAL NOT NULL,
        reports INTEGER NOT NULL,
        clip REAL NOT NULL,
        next_clip REAL NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE TABLE dp_spent (
        population TEXT NOT NULL REFERENCES populations(name),
        version INTEGER NOT NULL,
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        accountant TEXT NOT NULL,
        rounds INTEGER NOT NULL,
        PRIMARY KEY (population, version)
    );
    """,
    """
    ALTER TABLE sessions ADD COLUMN norm REAL;
    ALTER TABLE versions ADD COLUMN canary_json TEXT;
    """,
    """
    CREATE TABLE personal_evals (
        round_id INTEGER PRIMARY KEY REFERENCES rounds(id),
        counts_json TEXT NOT NULL,
        devices INTEGER NOT NULL
    );
    """,
]


class Store:
    """Thread-local SQLite connections to one database file, migrated on open."""

    def __init__(self, path: str | Path, fsync: bool = False, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._migrate()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_ms / 1000)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            self._local.conn, self._local.depth = conn, 0
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (nested calls join the outer one).

        Writers queue on a thread lock and an `flock` on `<database>.lock`
        before asking SQLite: a writer that finds the database locked would
        otherwise sleep in SQLite's busy handler (1, 2, 5, 10, ... ms) and wake
        up long after the lock is free; the kernel wakes an flock waiter at once.
        """
        if getattr(self._local, "depth", 0):
            with self._transaction("BEGIN IMMEDIATE") as conn:
                yield conn
            return
        with self._write_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                with self._transaction("BEGIN IMMEDIATE") as conn:
                    yield conn
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads."""
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        conn.execute(begin)
        self._local.depth = 1
        self._local.on_commit = []
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
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

    def close(self) -> None:
        """Close this thread's connection (other threads' close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self) -> None:
        with self.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for i in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={i + 1}")
