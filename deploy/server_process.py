"""A real Nightjar server (`python -m server run`, gunicorn) as a child process, always stopped.

The deployment's replicas (deploy.cluster), the tests, the benchmarks and
`make demo` start servers with this; the server itself does not depend on
it. The server runs in its own process group on a loopback port, so one
signal reaches the gunicorn master and its workers, and `kill` waits until
the whole group has gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

_REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_token(config: Path) -> str:
    """The operator token of the server that `config` configures (what `server init` wrote)."""
    from server.config import load_config
    from server.keys import operator_token as token

    cfg = load_config(config)
    return cfg.operator_token or token(cfg.operator_token_path)


class ServerProcess:
    """`python -m server run` in its own process group, so one signal reaches master and workers."""

    def __init__(self, config: Path, port: int, log: Path, workers: int = 2, threads: int = 4):
        self.config, self.port, self.log = config, port, log
        self.workers, self.threads = workers, threads
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def operator_headers(self) -> dict:
        """`Authorization` for the operator endpoints (the token `server init` wrote for this config)."""
        return {"Authorization": f"Bearer {operator_token(self.config)}"}

    def operator_get(self, path: str, timeout_s: float = 60.0) -> requests.Response:
        """GET `path` (e.g. an artifact or a round's detail) as the operator; raises on a non-2xx."""
        response = requests.get(self.url + path, headers=self.operator_headers, timeout=timeout_s)
        response.raise_for_status()
        return response

    def start(self) -> "ServerProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "run", "--config", str(self.config),
                 "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
                 "--threads", str(self.threads)],
                cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:   # not listening yet, or the workers still booting
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"server did not start: {self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        for _ in range(100):   # workers are reparented and reaped by init: wait for the group to vanish
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
