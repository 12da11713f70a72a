"""The server's schema, written once for both backends (server.store.sqlite, server.store.postgres).

`MIGRATIONS[i]` brings a database from schema version i to i+1. The SQL is
SQLite's dialect; `postgres_ddl` turns its column types into PostgreSQL's
(64-bit integers and doubles, BYTEA, identity keys), so both backends always
have the same tables. A migration is only ever appended, never edited: a
database made by an older release is upgraded by running the missing ones.

Each table has one owning module, the only one that writes it (tests/test_layout.py
checks this against `OWNERS`).
"""
from __future__ import annotations

import re

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
    # 2: each training round freezes its update spec (contract.update.spec.RoundSpec); running sums
    # are exact integers (contract.update.pipeline), so their weights are integers too.
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

# 9: rate-limit buckets in the shared database (PostgreSQL deployments: every replica throttles the
# same device; the embedded SQLite server keeps them in a file of its own, server.ratelimit).
MIGRATIONS.append("""
    CREATE TABLE rate_buckets (
        key TEXT PRIMARY KEY,
        tokens REAL NOT NULL,
        updated_at REAL NOT NULL,
        taken INTEGER NOT NULL
    );
    """)

# 10: a session records its population and the checkpoint it was given, so its owner (server.sessions)
# answers participation and artifact-access questions without reading the rounds or versions tables.
MIGRATIONS.append("""
    ALTER TABLE sessions ADD COLUMN population TEXT;
    ALTER TABLE sessions ADD COLUMN checkpoint_sha256 TEXT;
    UPDATE sessions SET population = (SELECT r.population FROM rounds r WHERE r.id = sessions.round_id);
    UPDATE sessions SET checkpoint_sha256 = (SELECT v.checkpoint_sha256 FROM rounds r JOIN versions v
        ON v.population = r.population AND v.version = r.model_version WHERE r.id = sessions.round_id);
    CREATE INDEX sessions_by_device ON sessions (device_id, state);
    """)

# 11: DP-FTRL (server.privacy): each event's release index and participation setting, what a version's ε
# assumes, every device's participations in the current horizon, and the check-ins the rule turned away.
MIGRATIONS.append("""
    ALTER TABLE dp_events ADD COLUMN dp_index INTEGER;
    ALTER TABLE dp_events ADD COLUMN min_separation_rounds INTEGER;
    ALTER TABLE dp_events ADD COLUMN max_participations INTEGER;
    ALTER TABLE dp_events ADD COLUMN horizon_rounds INTEGER;
    ALTER TABLE dp_events ADD COLUMN restart_every INTEGER;
    ALTER TABLE dp_events ADD COLUMN count_stddev REAL;
    ALTER TABLE dp_spent ADD COLUMN mechanism TEXT;
    ALTER TABLE dp_spent ADD COLUMN assumption TEXT;
    CREATE TABLE dp_participation (
        population TEXT NOT NULL REFERENCES populations(name),
        device_id TEXT NOT NULL,
        horizon INTEGER NOT NULL,
        count INTEGER NOT NULL,
        last_index INTEGER NOT NULL,
        PRIMARY KEY (population, device_id)
    );
    CREATE TABLE dp_refusals (
        population TEXT PRIMARY KEY REFERENCES populations(name),
        refused INTEGER NOT NULL,
        checkins INTEGER NOT NULL
    );
    """)

# 12: secure aggregation names the sessions whose revealed shares were wrong (they are corrected, or the
# round fails unmask_failed), for the round's analytics.
MIGRATIONS.append("""
    ALTER TABLE secagg_rounds ADD COLUMN wrong_revealers_json TEXT;
    """)

# The one module that writes and reads each table (tests/test_layout.py checks both on the source).
OWNERS = {
    "devices": "registry", "populations": "populations", "versions": "versions", "rounds": "rounds",
    "partials": "partials", "sessions": "sessions", "jobs": "publisher", "nonces": "enrollment",
    "public_artifacts": "artifact_access", "secagg_rounds": "secagg", "secagg_members": "secagg",
    "secagg_shares": "secagg", "secagg_reveals": "secagg", "discovery": "discover",
    "discovery_votes": "discover", "dp_events": "privacy", "dp_spent": "privacy",
    "dp_participation": "privacy", "dp_refusals": "privacy",
    "personal_evals": "personalize", "rate_buckets": "ratelimit",
}

_PG_TYPES = [
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]


def statements(migration: str) -> list[str]:
    """The statements of one migration (none of them contains a ';' inside a literal)."""
    return [s.strip() for s in migration.split(";") if s.strip()]


def postgres_ddl(statement: str) -> str:
    """SQLite's column types in `statement` as PostgreSQL's (SQLite REAL is a double, INTEGER 64-bit)."""
    for pattern, replacement in _PG_TYPES:
        statement = pattern.sub(replacement, statement)
    return statement
