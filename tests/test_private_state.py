"""The server's state on disk is its user's alone: the private directory 0700, databases and keys 0600.

Checked through the real commands: `server init` and `server run` create
nothing others can read; a wider mode left behind is narrowed at the next
start with a warning naming the path and its old mode; a mode the server
cannot narrow (here: a directory made immutable, which even root cannot
chmod) stops it with exit status 2.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.server_process import ServerProcess, free_port
from emulation.deployment import enrollment
from tests.server_fixtures import HttpTransport, enroll, init_small_population, write_small_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PRIVATE = {"nightjar.db", "nightjar.db-wal", "nightjar.db-shm", "nightjar.db.lock", "ratelimit.db",
           "ratelimit.db-wal", "operator_token", "pseudonym.key", "enrollment-en.json"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def state_files(root: Path) -> dict[str, Path]:
    """Every file of the private state directory and the database's files, by name."""
    files = {p.name: p for p in (root / "state" / "private").rglob("*") if p.is_file()}
    files.update({p.name: p for p in (root / "state").glob("nightjar.db*")})
    return files


def test_init_and_run_create_nothing_others_can_read(tmp_path):
    old = os.umask(0o022)               # what a shell usually has
    try:
        config = write_small_config(tmp_path)
        init_small_population(tmp_path, config)
        with ServerProcess(config, free_port(), tmp_path / "server.log") as server:
            assert enroll(HttpTransport(server.url), "en", enrollment(config, "en")).status == 201
            files = state_files(tmp_path)
            assert PRIVATE <= set(files), sorted(files)
            assert mode(tmp_path / "state" / "private") == 0o700
            wide = {name: oct(mode(p)) for name, p in files.items() if mode(p) & 0o077}
            assert not wide, wide
    finally:
        os.umask(old)


def test_a_wider_mode_is_narrowed_at_start_with_a_warning(tmp_path):
    config = write_small_config(tmp_path)
    init_small_population(tmp_path, config)
    with ServerProcess(config, free_port(), tmp_path / "first.log"):
        pass
    private = tmp_path / "state" / "private"
    widened = {private: 0o755, tmp_path / "state" / "nightjar.db": 0o644, private / "operator_token": 0o644,
               private / "ratelimit.db": 0o666, private / "pseudonym.key": 0o640}
    for path, wide in widened.items():
        os.chmod(path, wide)
    log = tmp_path / "second.log"
    with ServerProcess(config, free_port(), log):
        text = log.read_text()
        for path, wide in widened.items():
            assert mode(path) == wide & 0o700, path
            assert f"{path} was mode {wide:04o}: narrowed to {wide & 0o700:04o}" in text, text[-2000:]
    with ServerProcess(config, free_port(), tmp_path / "third.log"):
        assert "narrowed" not in (tmp_path / "third.log").read_text()     # nothing left to narrow


def immutable(path: Path, on: bool) -> bool:
    """Set or clear the file system's immutable attribute (chattr): then even root cannot chmod `path`."""
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_a_mode_the_server_cannot_narrow_stops_it_with_a_message(tmp_path):
    config = write_small_config(tmp_path)
    init_small_population(tmp_path, config)
    private = tmp_path / "state" / "private"
    os.chmod(private, 0o755)
    if not immutable(private, True):
        pytest.skip("chattr +i is not possible here (needs root and ext4-like file system)")
    try:
        done = subprocess.run([sys.executable, "-m", "server", "run", "--config", str(config), "--bind",
                               f"127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        immutable(private, False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{private} is mode 0755" in done.stderr and "cannot narrow" in done.stderr, done.stderr[-2000:]
    assert mode(private) == 0o755 and "serving on" not in done.stdout
