"""Several server replicas on one PostgreSQL database and one artifact store, behind nginx.

    cluster = Cluster(root, base_config, replicas=3).start()
    ... devices talk to cluster.url (nginx) ...
    cluster.kill(1); cluster.restart(1)
    cluster.stop()

Every replica gets the base config with `database` pointing at the shared
PostgreSQL, its own `replica` index (its partial-sum shards, its Prometheus
directory, its gunicorn process name) and `trust_forwarded_for` (nginx sets
X-Forwarded-For). Paths in the base config (artifact_dir, state_dir) are
shared: on several hosts they would be one network file system.
"""
from __future__ import annotations

import json
import os
import signal
import time
import tomllib
from pathlib import Path

import requests

from deploy import nginx
from deploy.postgres import PostgresServer
from deploy.server_process import ServerProcess, free_port
from server.config import PATH_KEYS


def replica_config(base: Path, out: Path, url: str, replica: int) -> Path:
    """The base config (TOML or JSON) as replica `replica` of a deployment on `url`, written as JSON."""
    text = base.read_text()
    data = json.loads(text) if base.suffix == ".json" else tomllib.loads(text)
    for key in PATH_KEYS:
        if key in data and key != "database":
            data[key] = str((base.parent / data[key]).resolve())
    data.update(database=url, replica=replica, trust_forwarded_for=True)
    out.write_text(json.dumps(data, indent=1))
    return out


class Cluster:
    def __init__(self, root: Path, base_config: Path, replicas: int = 3, port: int | None = None,
                 pg_port: int | None = None, workers: int = 1, threads: int = 8, fsync: bool = True,
                 pg_root: Path | None = None):
        self.root = Path(root)
        self.base_config = Path(base_config)
        self.port = port or free_port()
        self.pg = PostgresServer(pg_root or self.root / "postgres", pg_port or free_port(), fsync=fsync)
        self.ports = [free_port() for _ in range(replicas)]
        self.workers, self.threads = workers, threads
        self.replicas: list[ServerProcess] = []
        self._nginx = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.pg.url("nightjar")

    def config(self, i: int) -> Path:
        return self.root / f"replica-{i}.json"

    def prepare(self) -> "Cluster":
        """PostgreSQL up with the `nightjar` database, and every replica's config written (before
        `server init` runs against config(0))."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg.start()
        import psycopg
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'nightjar'").fetchone() is None:
                conn.execute('CREATE DATABASE "nightjar"')
        for i in range(len(self.ports)):
            replica_config(self.base_config, self.config(i), self.database_url, i)
        return self

    def start(self) -> "Cluster":
        """Replicas, then nginx in front of them; returns once nginx answers /healthz."""
        if not self.config(0).exists():
            self.prepare()
        self.replicas = [ServerProcess(self.config(i), port, self.root / f"replica-{i}.log",
                                       self.workers, self.threads) for i, port in enumerate(self.ports)]
        for r in self.replicas:
            r.start()
        conf = nginx.write_config(self.root / "nginx", self.port, self.ports)
        self._nginx = nginx.start(self.root / "nginx", conf)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"nginx did not answer: {(self.root / 'nginx' / 'error.log').read_text()[-2000:]}")
        self._write_state()
        return self

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill replica i's whole process group (master and workers) and wait until it has gone."""
        self.replicas[i].kill(sig)

    def restart(self, i: int) -> None:
        self.replicas[i].start()
        self._write_state()

    def stop(self) -> None:
        if self._nginx is not None:
            _killpg(self._nginx.pid, signal.SIGQUIT)
            self._nginx.wait(timeout=15)
            self._nginx = None
        for r in self.replicas:
            r.kill(signal.SIGTERM)
        self.pg.stop()
        (self.root / "cluster.json").unlink(missing_ok=True)

    def _write_state(self) -> None:
        state = {"url": self.url, "database": self.database_url, "postgres": str(self.pg.root),
                 "nginx_pid": self._nginx.pid if self._nginx else None,
                 "replicas": [{"port": r.port, "pid": r.proc.pid if r.proc else None, "config": str(r.config)}
                              for r in self.replicas]}
        (self.root / "cluster.json").write_text(json.dumps(state, indent=1))


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_recorded(root: Path) -> bool:
    """Stop a deployment that `python -m deploy up` left running (from its cluster.json)."""
    path = Path(root) / "cluster.json"
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    if state.get("nginx_pid"):
        _killpg(state["nginx_pid"], signal.SIGQUIT)
    for r in state["replicas"]:
        if r["pid"]:
            _killpg(r["pid"], signal.SIGTERM)
    PostgresServer(Path(state["postgres"]), 0).stop()
    path.unlink()
    return True
