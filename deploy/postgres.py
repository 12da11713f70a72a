"""A PostgreSQL server of our own in a directory: initdb, start, databases, stop.

Uses the binaries of an installed PostgreSQL (Debian's `postgresql` package puts
them in /usr/lib/postgresql/<major>/bin; `NIGHTJAR_PG_BIN` points elsewhere).
PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` user (which Debian's package creates) and owns its directory.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "nightjar"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or no way to run them (the reason says which)."""


def binaries() -> Path:
    """The directory holding initdb and pg_ctl."""
    candidates = [os.environ.get("NIGHTJAR_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    candidates += [str(Path(which).parent)] if which else []
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise PostgresUnavailable("no PostgreSQL binaries (initdb, pg_ctl): install Debian's `postgresql` "
                              "package or set NIGHTJAR_PG_BIN")


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no `postgres` user to run PostgreSQL as") from None
    return ["runuser", "-u", "postgres", "--"]


class PostgresServer:
    """One PostgreSQL cluster: its data in `root/data`, its socket in `root`, TCP on 127.0.0.1:`port`."""

    def __init__(self, root: str | Path, port: int, fsync: bool = True):
        self.root = Path(root)
        self.port = port
        self.fsync = fsync
        self.bin = binaries()
        self._as = _run_as()

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _own(self) -> None:
        if self._as:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o755)

    def start(self) -> "PostgresServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self._own()
        if not (self.data / "PG_VERSION").exists():
            done = subprocess.run(self._as + [str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
                                              "--auth=trust", "-E", "UTF8", "--no-instructions"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise PostgresUnavailable(f"initdb failed in {self.data}: {done.stderr.strip()[-1000:]}"
                                          + (" (the postgres user must be able to enter every directory above it)"
                                             if self._as else ""))
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
                   + ("" if self.fsync else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"))
        done = subprocess.run(self._as + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                                          "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "start"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise PostgresUnavailable(f"PostgreSQL did not start: {done.stderr.strip() or done.stdout.strip()}; "
                                      f"see {self.root / 'postgres.log'}")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True)

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database, empty or a copy of `template` (which nobody may be connected to); its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def temporary(port: int) -> PostgresServer:
    """A throwaway, fsync-free server in a fresh directory that the `postgres` user can enter."""
    root = Path(tempfile.mkdtemp(prefix="nightjar-pg-"))
    return PostgresServer(root, port, fsync=False).start()
