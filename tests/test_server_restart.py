"""Kill the real server (gunicorn, 2 worker processes) with SIGKILL mid-round and restart it.

Invariants checked after each restart on the same database and artifact folder:
* the round continues: updates accepted before the kill are still counted, once;
  a retried upload of one of them is answered "duplicate" and not re-counted;
* an upload that was half-received at the kill was not counted, and the device's
  retry is accepted;
* the completed round's new version equals the initial weights plus the weighted
  average of exactly the accepted deltas (none lost, none twice);
* after a second kill the completed round and its version are intact, every
  artifact's bytes hash to its name, SQLite's integrity check passes and no
  partial-sum file of a closed round is left behind;
* a round whose deadline passed while the server was down is closed cleanly
  (failed: too few reports) on restart and retried as attempt 2.
"""
from __future__ import annotations

import hashlib
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from contract.update.pipeline import aggregate
from contract.model.weights import load_checkpoint
from emulation.deployment import enrollment
from deploy.server_process import ServerProcess, free_port
from tests.server_fixtures import (DeviceClient, HttpTransport, init_small_population,
                                   write_small_config)

pytestmark = pytest.mark.slow


def round_info(server: ServerProcess, number: int) -> dict:
    return requests.get(f"{server.url}/v1/populations/en/rounds/{number}", timeout=10,
                        headers=server.operator_headers).json()


def half_sent_upload(server: ServerProcess, device: DeviceClient, body: bytes) -> socket.socket:
    """Send the headers and half the body of an upload, then stall (as a phone losing its network)."""
    sid = device.assignment["session_id"]
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST /v1/sessions/{sid}/update?model_version=0&num_examples=4 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {device.device_id}:{device.secret}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def verify_state(root: Path) -> None:
    artifacts = root / "state" / "artifacts"
    files = [p for p in artifacts.glob("??/*")]
    assert files and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in files)
    conn = sqlite3.connect(root / "state" / "nightjar.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        open_rounds = {r[0] for r in conn.execute(
            "SELECT id FROM rounds WHERE state IN ('selecting', 'reporting')")}
    finally:
        conn.close()
    leftovers = {int(p.parent.name) for p in (root / "state" / "private" / "partials").glob("*/*.i64")}
    assert leftovers <= open_rounds
    conn = sqlite3.connect(root / "state" / "nightjar.db")
    try:    # a closed round leaves nothing behind: no partial-sum rows either
        stale = {r[0] for r in conn.execute("SELECT DISTINCT round_id FROM partials")} - open_rounds
    finally:
        conn.close()
    assert not stale


def test_sigkill_mid_round_then_restart_keeps_every_accepted_update_exactly_once(tmp_path):
    config = write_small_config(tmp_path)
    initial = init_small_population(tmp_path, config)
    server = ServerProcess(config, free_port(), tmp_path / "server.log")
    stalled = None
    try:
        server.start()
        devices = [DeviceClient(HttpTransport(server.url), "en", enrollment(config, "en")) for _ in range(9)]
        for d in devices:
            assert "assignment" in d.checkin().body
        size = devices[0].assignment["update"]["size"]
        deltas = np.random.default_rng(3).normal(0, 0.01, (9, size)).astype(np.float32)
        counts = [4, 9, 1, 4, 6, 2]
        bodies = [devices[i].encode(deltas[i], counts[i])[0] for i in range(6)]   # 8-bit, the default
        for i in range(3):
            assert devices[i].upload(deltas[i], counts[i]).body["status"] == "accepted"
        stalled = half_sent_upload(server, devices[3], bodies[3])
        time.sleep(0.5)
        server.kill()                                            # SIGKILL master and both workers
        stalled.close()

        server.start()
        info = round_info(server, 1)
        assert (info["state"], info["selected"], info["reported"]) == ("reporting", 9, 3)
        again = devices[0].upload(deltas[0], counts[0]).body
        assert again == {"status": "accepted", "round": 1, "reason": "duplicate"}
        assert round_info(server, 1)["reported"] == 3
        for i in (3, 4, 5):
            assert devices[i].upload(deltas[i], counts[i]).body["status"] == "accepted"
        info = round_info(server, 1)
        assert (info["state"], info["reported"], info["result_version"]) == ("completed", 6, 1)
        assert devices[6].upload(deltas[6], 3).body["reason"] == "round_closed"

        server.kill()
        verify_state(tmp_path)
        server.start()
        versions = requests.get(server.url + "/v1/populations/en/versions", timeout=10,
                                headers=server.operator_headers).json()["versions"]
        assert [v["version"] for v in versions] == [1, 0]
        ckpt = requests.get(f"{server.url}/v1/artifacts/{versions[0]['checkpoint_sha256']}", timeout=10,
                            headers=server.operator_headers)
        assert hashlib.sha256(ckpt.content).hexdigest() == versions[0]["checkpoint_sha256"]
        (tmp_path / "v1.safetensors").write_bytes(ckpt.content)
        _, flat, meta = load_checkpoint(tmp_path / "v1.safetensors")
        assert meta["version"] == 1 and meta["parent"] == 0
        expected = initial + aggregate(devices[0].pipeline(), zip(bodies, counts))
        np.testing.assert_allclose(flat, expected, rtol=0, atol=1e-7)   # exact up to float32 rounding
        np.testing.assert_allclose(flat, initial + np.average(deltas[:6], axis=0, weights=counts),
                                   atol=2e-3)                            # and 8-bit close to float
        nxt = devices[7].checkin().body["assignment"]
        assert (nxt["round"], nxt["model_version"]) == (2, 1)
        assert round_info(server, 1)["reported"] == 6
    finally:
        if stalled is not None:
            stalled.close()
        server.kill()
    verify_state(tmp_path)


def test_round_whose_deadline_passed_while_down_is_abandoned_and_retried(tmp_path):
    config = write_small_config(tmp_path, goal=4, over_selection=1.0, selection_window_s=1.0,
                          reporting_window_s=2.0)
    init_small_population(tmp_path, config)
    server = ServerProcess(config, free_port(), tmp_path / "server.log")
    try:
        server.start()
        devices = [DeviceClient(HttpTransport(server.url), "en", enrollment(config, "en")) for _ in range(3)]
        for d in devices:
            d.checkin()
        size = devices[0].assignment["update"]["size"]
        assert devices[0].upload(np.zeros(size, np.float32), 1).body["status"] == "accepted"
        deadline = round_info(server, 1)["deadline"]
        server.kill()
        time.sleep(max(0.0, deadline - time.time() + 0.2))      # the deadline passes while down
        server.start()
        for _ in range(100):                                     # the ticker closes the round
            info = round_info(server, 1)
            if info["state"] == "failed":
                break
            time.sleep(0.1)
        assert (info["state"], info["reason"], info["reported"]) == ("failed", "too_few_reports", 1)
        late = devices[1].upload(np.zeros(size, np.float32), 1).body
        assert (late["status"], late["reason"]) == ("aborted", "late")
        retry = devices[2].checkin().body["assignment"]
        assert retry["round"] == 2 and retry["model_version"] == 0
        versions = requests.get(server.url + "/v1/populations/en/versions", timeout=10,
                                headers=server.operator_headers).json()["versions"]
        assert [v["version"] for v in versions] == [0]
    finally:
        server.kill()
    verify_state(tmp_path)
