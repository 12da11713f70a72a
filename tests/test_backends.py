"""Issue 20: the two backends, several replicas on one database, and schema upgrades.

The tests of this module run on SQLite and on PostgreSQL (tests/conftest.py
BOTH_BACKENDS). A second replica is a second `Services` built from the same
config (on PostgreSQL with its own replica index): another process on another
host would share exactly the database and the state directory, nothing else.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from server.tasks.train import Upload
from contract.update.pipeline import UpdatePipeline
from contract.protocol.wire import Conditions
from server import metrics
from server.config import load_config
from server.services import build_services
from tests.server_fixtures import ELIGIBLE
from tests.test_server_views import dump_tables


class Dev:
    """A device that may talk to any replica (pace steering and sessions are shared state)."""

    def __init__(self, services, population="en"):
        reg = services.registry.register(population)
        self.id, self.auth, self.population, self.assignment = reg.device_id, f"Bearer {reg.device_id}:{reg.secret}", \
            population, None

    def checkin(self, services):
        device = services.registry.authenticate(self.auth)
        result = services.checkin.checkin(device, self.population, Conditions.from_json(dict(ELIGIBLE)))
        if hasattr(result, "session_id"):
            self.assignment = result
        return result

    def upload(self, services, delta, num_examples=10):
        a = self.assignment
        encoded = UpdatePipeline(a.update).encode(delta, num_examples, a.hyperparameters["seed"])
        return services.reporting.report(self.id, a.session_id, "train",
                                         Upload(encoded.body, a.model_version, encoded.weight, {}))


def second_replica(env, backend):
    config = {**env.config, "replica": 1 if backend == "postgresql" else 0}
    return build_services(load_config(config), clock=env.clock, exporter=env.exporter)


def weights(services, population, version):
    return np.array(services.versions.weights(services.versions.get(population, version)))


def completed_transitions() -> float:
    return sum(v for labels, v in metrics.totals("nightjar_round_transitions") if labels["state"] == "completed")


def test_two_replicas_racing_to_close_a_round_make_one_version(make_server, backend):
    env = make_server()
    a, b = env.services, second_replica(env, backend)
    rng = np.random.default_rng(0)
    flat = env.flat
    for number in (1, 2, 3):
        devs = [Dev(a) for _ in range(3)]
        for i, d in enumerate(devs):
            assert hasattr(d.checkin(a if i % 2 else b), "session_id")     # either replica selects
        env.clock.advance(61)
        deltas = rng.normal(0, 0.01, (2, env.layout.size)).astype(np.float32)
        assert devs[0].upload(a, deltas[0]).status == "accepted"             # one report through each
        assert devs[1].upload(b, deltas[1]).status == "accepted"
        env.clock.advance(300)                                               # deadline: both may close it
        before = completed_transitions()
        barrier = threading.Barrier(8)
        errors = []

        def close(services):
            try:
                barrier.wait()
                services.rounds.advance(env.population)
            except Exception as e:      # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=close, args=(s,)) for s in (a, b) * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert completed_transitions() - before == 1                          # closed exactly once
        assert [v.version for v in a.versions.list(env.population)][0] == number
        rows = a.store.connection().execute("SELECT number, state FROM rounds WHERE number = ?",
                                            (number,)).fetchall()
        assert [tuple(r) for r in rows] == [(number, "completed")]
        flat = flat + deltas.mean(0)
        np.testing.assert_allclose(weights(b, env.population, number), flat, rtol=1e-5, atol=1e-6)
    b.store.close()


def _columns(conn, table: str) -> list[str]:
    return [d[0] for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description]


def _previous_release_database(env, backend, request, tmp_path, monkeypatch) -> str:
    """A database made by the previous schema (MIGRATIONS[:-1]) holding the rows `env` wrote, in the
    columns that schema has: what a server of the previous release leaves behind."""
    import server.store.base
    from server.schema import MIGRATIONS
    from server.store import open_store

    monkeypatch.setattr(server.store.base, "MIGRATIONS", MIGRATIONS[:-1])
    url = (request.getfixturevalue("postgres_server").create_database("upgrade") if backend == "postgresql"
           else str(tmp_path / "previous.db"))
    old, new = open_store(url), env.services.store.connection()
    with old.write() as tx:
        for table in old.tables():
            columns = _columns(tx, table)
            rows = [tuple(r[c] for c in columns) for r in new.execute(f"SELECT {', '.join(columns)} FROM {table}")]
            if rows:
                tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                               rows)
        if backend == "postgresql":                 # identity columns continue after the copied ids
            for table in ("rounds", "jobs"):
                tx.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                           f" GREATEST((SELECT MAX(id) FROM {table}), 1))")
    old.close()
    monkeypatch.setattr(server.store.base, "MIGRATIONS", MIGRATIONS)
    return url


def test_a_database_of_the_previous_schema_is_upgraded_with_all_its_data(make_server, backend, monkeypatch, request,
                                                                        tmp_path):
    env = make_server(goal=2, over_selection=1.0)
    devs = [Dev(env.services) for _ in range(2)]
    for d in devs:
        d.checkin(env.services)
    for d in devs:
        d.upload(env.services, np.full(env.layout.size, 0.01, np.float32))
    assert env.services.versions.list(env.population)[0].version == 1
    wrote = dump_tables(env.services.store)
    url = _previous_release_database(env, backend, request, tmp_path, monkeypatch)
    env.services.store.close()

    upgraded = build_services(load_config({**env.config, "database": url}), clock=env.clock, exporter=env.exporter)
    assert dump_tables(upgraded.store) == wrote        # every row kept, and the new columns filled from the old
    more = [Dev(upgraded) for _ in range(2)]
    for d in more:
        d.checkin(upgraded)
    for d in more:
        assert d.upload(upgraded, np.full(env.layout.size, 0.01, np.float32)).status == "accepted"
    assert upgraded.versions.list(env.population)[0].version == 2           # and it goes on
    upgraded.store.close()


def _scripted_rounds(env) -> dict:
    """Three training rounds with fixed updates, one device failing, one late: what they produced."""
    svc = env.services
    rng = np.random.default_rng(7)
    for _ in range(3):
        devs = [Dev(svc) for _ in range(4)]
        for d in devs:
            d.checkin(svc)
        env.clock.advance(61)
        deltas = rng.normal(0, 0.01, (4, env.layout.size)).astype(np.float32)
        devs[0].upload(svc, deltas[0], 3)
        devs[1].upload(svc, deltas[1], 9)
        svc.reporting.failure(devs[2].id, devs[2].assignment.session_id, "unplugged")
        env.clock.advance(300)
        svc.tick()
        devs[3].upload(svc, deltas[3])                                       # late
    rounds = svc.analytics.list(env.population, env.clock.now(), limit=10)
    keep = ("round", "task", "state", "reason", "selected", "reported", "aborted", "failed", "dropped",
            "result_version", "bytes_in")
    return {"rounds": [{k: r[k] for k in keep} for r in rounds],
            "weights": [hashlib.sha256(weights(svc, env.population, v.version).tobytes()).hexdigest()
                        for v in svc.versions.list(env.population)]}


def test_sqlite_and_postgresql_give_identical_results_for_the_same_scripted_rounds(make_server, postgres_server):
    on_sqlite = make_server()
    on_postgres = make_server(server={"database": postgres_server.create_database("agree")})
    assert on_sqlite.services.store.dialect == "sqlite" and on_postgres.services.store.dialect == "postgresql"
    a, b = _scripted_rounds(on_sqlite), _scripted_rounds(on_postgres)
    assert a["rounds"][0]["state"] == "completed" and len(set(a["weights"])) == 4
    assert a == b
    on_postgres.services.store.close()
    postgres_server.drop_database("agree")


@pytest.mark.parametrize("bad", ["replica = 2", "replica = -1"])
def test_replica_index_is_checked(tmp_path, bad):
    from server.config import ConfigError

    path = tmp_path / "server.toml"
    path.write_text(f'database = "x.db"\n{bad}\n')
    with pytest.raises(ConfigError, match="replica"):
        load_config(path)


def test_sqlite_dialect_is_translated_outside_quoted_strings_only():
    from server.store.postgres import translate

    assert translate("SELECT a FROM t WHERE b = ? AND c = '?%' AND d LIKE 'x%'") == \
        "SELECT a FROM t WHERE b = %s AND c = '?%%' AND d LIKE 'x%%'"
    assert translate("SELECT 5 % 2, ?") == "SELECT 5 %% 2, %s"


def test_percent_and_question_marks_reach_postgresql_as_written(postgres_server):
    from server.store.postgres import PostgresStore

    store = PostgresStore(postgres_server.create_database("quote"))
    try:
        conn = store.connection()
        assert tuple(conn.execute("SELECT '?%', 7 % 4, ?", (1,)).fetchone()) == ("?%", 3, 1)
        assert conn.execute("SELECT '50%'").fetchone()[0] == "50%"
    finally:
        store.close()
        postgres_server.drop_database("quote")


def test_postgres_rows_read_like_sqlite_rows(postgres_server):
    from server.store.postgres import PostgresStore

    store = PostgresStore(postgres_server.create_database("rows"))
    try:
        row = store.connection().execute("SELECT 1 AS a, 'x' AS b, SUM(v) AS s FROM (VALUES (2), (3)) AS t(v)").fetchone()
        assert (row["a"], row[1], row["s"], row.keys()) == (1, "x", 5, ["a", "b", "s"])
        assert isinstance(row["s"], int)                        # NUMERIC of a sum of integers, as SQLite gives
        with pytest.raises(RuntimeError, match="read snapshot"):
            with store.read():
                with store.write():
                    pass
    finally:
        store.close()
        postgres_server.drop_database("rows")
