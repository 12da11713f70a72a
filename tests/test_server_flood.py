"""A registration flood from one address is rate-limited while honest devices complete a round.

The real server (gunicorn) with the default rate limits. One address
(127.0.0.1) sends about 1,000 registrations a second (and a nonce request for every nine) for as long as
the round takes; twenty honest devices, each from an address of its own
(127.0.0.2 ... 127.0.0.21: all of 127/8 is loopback), enroll, check in and
upload meanwhile. The flood must get 429s with Retry-After, the honest
devices must all be served, and the round must complete.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import requests
from requests.adapters import HTTPAdapter

from contract.protocol import version as protocol
from emulation.deployment import enrollment
from deploy.server_process import ServerProcess, free_port
from tests.server_fixtures import DeviceClient, HttpTransport, init_small_population, write_small_config

pytestmark = pytest.mark.slow
HONEST = 20


class FromAddress(HTTPAdapter):
    """Connections from a chosen local address (a device behind its own IP)."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def transport_from(url: str, address: str) -> HttpTransport:
    t = HttpTransport(url)
    t.session.mount("http://", FromAddress(address))
    return t


async def flood(port: int, stop: threading.Event, counts: dict, connections: int = 16,
                per_second: float = 1100.0) -> None:
    body = json.dumps({"population": "en", "app_credential": "x" * 30,
                       "attestation": {"statement": "e30", "signature": "AAAA"}}).encode()
    nonce_body = json.dumps({"population": "en"}).encode()

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i, start, interval = 0, time.monotonic(), connections / per_second
        while not stop.is_set():
            # Mostly registrations (with a made-up attestation), every tenth a nonce request.
            path, payload = ("/v1/enrollment/nonces", nonce_body) if i % 10 == 0 else ("/v1/devices", body)
            i += 1
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"{protocol.HEADER}: {protocol.CURRENT}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length, retry_after = 0, None
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                if name.lower() == "retry-after":
                    retry_after = int(value)
            await reader.readexactly(length)
            counts[status] = counts.get(status, 0) + 1
            counts["registrations"] = counts.get("registrations", 0) + (path == "/v1/devices")
            if status == 429:
                counts["retry_after_ok"] = counts.get("retry_after_ok", 0) + (retry_after is not None
                                                                              and retry_after > 0)
            # On a schedule of `per_second` in all: a slow answer is caught up on, not skipped.
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
        writer.close()

    await asyncio.gather(*[worker(k) for k in range(connections)])


def test_a_flood_from_one_address_is_throttled_while_honest_devices_complete_a_round(tmp_path):
    config = write_small_config(tmp_path, goal=HONEST, min_round_size=5, over_selection=1.0,
                                min_report_fraction=1.0, reporting_window_s=3600.0)
    init_small_population(tmp_path, config)
    counts: dict = {}
    stop = threading.Event()
    with ServerProcess(config, free_port(), tmp_path / "server.log", workers=2, threads=8) as server:
        flooder = threading.Thread(target=lambda: asyncio.run(flood(server.port, stop, counts)), daemon=True)
        t0 = time.monotonic()
        flooder.start()
        try:
            time.sleep(1.0)                                   # the flood is under way first
            before_honest = counts.get("registrations", 0)
            devices = [DeviceClient(transport_from(server.url, f"127.0.0.{2 + i}"), "en",
                                    enrollment(config, "en")) for i in range(HONEST)]
            delta = np.full(devices[0].checkin().body["assignment"]["update"]["size"], 1e-3, np.float32)
            for d in devices[1:]:
                assert "assignment" in d.checkin().body
            answers = [d.upload(delta, 10).body for d in devices]
            during_honest = counts.get("registrations", 0) - before_honest
        finally:
            stop.set()
            flooder.join(timeout=30)
        elapsed = time.monotonic() - t0
        info = requests.get(f"{server.url}/v1/populations/en/rounds/1", headers=server.operator_headers,
                            timeout=10).json()
    flood_requests = sum(v for k, v in counts.items() if isinstance(k, int))
    print(f"flood: {flood_requests} requests in {elapsed:.1f} s ({flood_requests / elapsed:.0f}/s): {counts}; "
          f"honest: {[a['status'] for a in answers].count('accepted')} of {HONEST} accepted")
    # The flood really ran: ten times the registration burst, and on throughout the honest round
    # (its rate depends on the machine, so it is asserted against the limit, not against the clock).
    assert counts["registrations"] > 10 * 60 and during_honest > 60
    # Past the per-address bursts (60 nonces, 60 registration attempts: the defaults), every request
    # of the flood was answered 429 with a Retry-After; its registrations, without a valid
    # attestation, were all refused.
    assert counts.get(201, 0) <= 60 and counts.get(401, 0) <= 60
    assert counts.get(429, 0) == flood_requests - counts.get(201, 0) - counts.get(401, 0) > 0.8 * flood_requests
    assert counts["retry_after_ok"] == counts[429]
    assert all(a["status"] == "accepted" for a in answers)       # every honest device was served
    assert (info["state"], info["reported"]) == ("completed", HONEST)
