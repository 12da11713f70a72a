"""`python -m device_runtime add|status` and the errors of a bad `--data` (run: test_device_e2e)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from device_runtime.opstats import OpStats

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_runtime", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_add_and_status(tmp_path):
    data = tmp_path / "phone"
    added = run_cli("add", "--data", str(data), "Good morrow, my lord.", "How dost thou?")
    assert added.returncode == 0 and added.stdout.strip() == "2 examples stored", added
    log = OpStats(data / "opstats.db")
    log.log(1_795_000_000, "checkin", "assigned", task="train", session="s-1")
    log.log(1_795_000_001, "task", "completed", task="train", round=4, examples=36, batches=3,
            download_s=0.25, train_s=1.5, upload_s=0.125, bytes_in=2_000_000, bytes_out=16_432)
    log.log(1_795_000_900, "checkin", "rejected", reason="round_full")
    log.close()
    status = run_cli("status", "--data", str(data), "--last", "2")
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "3 events, last completed task 2026-11-18 11:06:41 UTC" in out
    assert "examples stored: 2" in out and "app model installed: none" in out
    assert "task      completed         1" in out and "checkin   rejected          1" in out
    assert "last 2 events" in out and "reason round_full" in out
    assert ("train round 4; 36 examples, 3 batches; download 0.250 s, train 1.500 s, upload 0.125 s; "
            "1.9 MiB in, 16.0 KiB out") in out


def test_cli_refuses_a_bad_data_directory(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for args, message in [(("status", "--data", str(tmp_path / "missing")), "no device data directory"),
                          (("status", "--data", str(tmp_path)), "holds no device data"),
                          (("add", "--data", str(a_file), "text"), "is not a directory"),
                          (("run", "--server", "http://127.0.0.1:9", "--data", str(a_file)),
                           "is not a directory"),
                          (("run", "--server", "localhost:9", "--data", str(tmp_path)), "http(s)://")]:
        done = run_cli(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "--data" in done.stderr or "--server" in done.stderr
