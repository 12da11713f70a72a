"""Shared fixtures, and the guards that no process the tests started outlives the session."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a TFF `worker_binary` or any other process started by it is still running
    (servers, fleets, exporters).

    Code under test must stop its processes itself (models.tff_runtime, servers
    in `finally`); this only detects a leak, reports it, and then cleans up so
    CI never hangs.
    """
    from models.tff_runtime import is_alive, stop_workers, worker_processes

    leaked = [p for p in worker_processes() if is_alive(p)]
    if leaked:
        stop_workers()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: {len(leaked)} TFF worker_binary process(es) left running by the "
              f"tests: {[p.pid for p in leaked]} (stopped now)")
    left = _leftover_processes(session)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: {len(left)} process(es) started by the tests still running: "
              f"{[p.pid for p in left]} (killed now)")
        for p in left:
            with contextlib.suppress(Exception):
                print(f"  {p.pid}: {' '.join(p.cmdline()[:6])}")
                p.kill()


def _leftover_processes(session) -> list:
    """Children of this run, and anything running from its temporary directory (a server's
    gunicorn workers outlive their master if it dies first: they are no longer our children)."""
    import psutil

    from models.tff_runtime import is_alive

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = str(factory.getbasetemp()) if factory is not None else None
    if base:
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != me.pid and any(base in arg for arg in p.info["cmdline"] or ()):
                found[p.pid] = p
    return [p for p in found.values() if is_alive(p)]


# --- server (issue 4): an app on a temporary state directory, driven by a manual clock ---

# Float32 updates, a clip and a cap far above what the tests send: the averages they check are
# exact. Tests of the quantized pipeline pass their own `update`.
TEST_UPDATE = {"bits": 32, "clip_norm": 100.0, "max_weight": 1000}

# --- backends (issue 20): the server's unit tests run on SQLite and on PostgreSQL ---

# Modules whose make_server tests run twice, once per backend.
BOTH_BACKENDS = {"test_server_rounds", "test_server_partials", "test_server_updates", "test_server_views",
                 "test_server_restart", "test_server_publish", "test_server_optimizers", "test_enrollment",
                 "test_secagg_server", "test_dp_server", "test_discovery_server", "test_personal_server",
                 "test_backends"}


def pytest_generate_tests(metafunc):
    import inspect

    compares = "postgres_server" in inspect.signature(metafunc.function).parameters   # uses both itself
    if ("backend" in metafunc.fixturenames and not compares
            and metafunc.module.__name__.split(".")[-1] in BOTH_BACKENDS):
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the whole run (deploy.postgres); skipped, with the reason
    shown, only where PostgreSQL cannot be installed or started."""
    import socket

    from deploy.postgres import PostgresUnavailable, temporary

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        server = temporary(port)
    except PostgresUnavailable as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")
    from server.store.postgres import PostgresStore

    PostgresStore(server.create_database("migrated")).close()   # the schema once; tests copy it
    yield server
    server.stop()
    import shutil
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def backend(request):
    """"sqlite" (the default), or "postgresql" in the modules of BOTH_BACKENDS."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database(backend, request, tmp_path):
    """A factory of fresh databases on the test's backend: `database(root)` → the config's `database`."""
    made = []

    def make(root):
        if backend == "sqlite":
            return str(root / "nightjar.db")
        server = request.getfixturevalue("postgres_server")
        name = f"t{os.getpid()}_{abs(hash((request.node.nodeid, len(made)))) % 10**10}"
        made.append(name)
        return server.create_database(name, template="migrated")

    yield make
    if made:
        server = request.getfixturevalue("postgres_server")
        for name in made:
            server.drop_database(name)


@pytest.fixture
def make_server(tmp_path, database):
    """Factory: `make_server(**population_overrides)` → env with app, services, clock, exporter.

    The population "en" has the small test layout (tests.server_fixtures.SMALL_LAYOUT),
    permissive eligibility, goal 4 (max 6 selected, >= 2 to start and to complete: the
    minimum cohort is lowered to 1 for these tests; tests of it set their own),
    plain SGD with lr 1 on the server, float32 updates (TEST_UPDATE) and no background ticker.
    `env.enrollment` is what its devices enroll with, `env.operator_headers` what operators send.
    """
    from types import SimpleNamespace

    from server import create_app
    from contract.clock import ManualClock
    from server.registration import register_population
    from tests.server_fixtures import (FakeExporter, SMALL_LAYOUT, device_test_client, enrollment_for,
                                       write_checkpoint, write_plan_dir)

    made = []

    def make(name: str = "en", server: dict | None = None, **population):
        root = tmp_path / f"server{len(made)}"
        root.mkdir()
        settings = {"goal": 4, "min_round_size": 1, "over_selection": 1.5, "min_selected_fraction": 0.5,
                    "min_report_fraction": 0.5, "selection_window_s": 60.0,
                    "reporting_window_s": 300.0, "eval_every": 0, "publish_every": 0,
                    "server_optimizer": "sgd", "server_lr": 1.0,
                    "eligibility": {"min_separation_s": 0.0, "min_free_memory_mb": 0},
                    "update": dict(TEST_UPDATE)}
        settings.update(population)
        config = {"database": database(root), "artifact_dir": str(root / "artifacts"),
                  "state_dir": str(root / "private"), "tick_interval_s": 0,
                  "populations": {name: settings}, **(server or {})}
        clock, exporter = ManualClock(), FakeExporter()
        app = create_app(config, clock=clock, exporter=exporter)
        services = app.extensions["nightjar"]
        flat = write_checkpoint(root / "init.safetensors", model_config={"vocab_size": 5})
        register_population(services.store, services.artifacts, clock, name, root / "init.safetensors",
                            plan_dir=write_plan_dir(root / "plan"))
        env = SimpleNamespace(app=app, services=services, clock=clock, exporter=exporter, root=root,
                              population=name, layout=SMALL_LAYOUT, flat=flat, config=config,
                              client=device_test_client(app), enrollment=enrollment_for(services, name, clock),
                              operator_headers={"Authorization": f"Bearer {services.operator_token}"})
        made.append(env)
        return env

    yield make
    for env in made:
        env.services.store.close()


@pytest.fixture
def server_env(make_server):
    return make_server()


@pytest.fixture
def client(server_env):
    """Flask's test client of a fresh server (population "en", see make_server)."""
    return server_env.client
