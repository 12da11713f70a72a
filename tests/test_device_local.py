"""Device-side pieces that need no Nightjar server: conditions, policy, stores, transport, artifact
cache, and a device facing an unreachable or failing server."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import os
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.client import ArtifactCache, CorruptDownload
from device_runtime.conditions import DeviceConditions, EmulatedConditions, LinuxConditions
from device_runtime.enrollment import Enrollment, KeyAttester
from device_runtime.example_store import ExampleStore, Retention
from device_runtime.opstats import OpStats
from device_runtime.policy import TrainingPolicy
from device_runtime.runtime import Device, DeviceSettings
from device_runtime.transport import RetryPolicy, ServerUnavailable, Transport
from deploy.server_process import free_port

NIGHT = dt.datetime(2026, 11, 23, 23, 30)


def conditions(**overrides) -> DeviceConditions:
    base = dict(charging=True, battery=0.8, idle=True, unmetered=True, free_memory_mb=2048,
                local_time=NIGHT)
    return DeviceConditions(**{**base, **overrides})


def test_policy_allows_a_charging_idle_phone_on_wifi_at_night():
    assert TrainingPolicy().blockers(conditions()) == []


@pytest.mark.parametrize("change, reason", [
    (dict(charging=False), "unplugged"),
    (dict(idle=False), "not_idle"),
    (dict(unmetered=False), "metered_network"),
    (dict(battery=0.2), "low_battery"),
    (dict(free_memory_mb=100), "low_memory"),
    (dict(local_time=dt.datetime(2026, 11, 23, 14, 0)), "outside_window"),
])
def test_policy_names_each_blocker(change, reason):
    assert TrainingPolicy().blockers(conditions(**change)) == [reason]


def test_policy_wants_enough_examples_and_reads_equal_window_ends_as_all_day():
    p = TrainingPolicy(min_examples=5, window_start=dt.time(0), window_end=dt.time(0))
    assert p.blockers(conditions(local_time=dt.datetime(2026, 1, 1, 13, 0)), num_examples=5) == []
    assert p.blockers(conditions(), num_examples=4) == ["too_few_examples"]
    assert p.blockers(conditions()) == []          # mid-task: the examples are not re-counted


def test_window_wraps_midnight_and_says_when_it_opens():
    p = TrainingPolicy()
    assert p.in_window(dt.time(23, 0)) and p.in_window(dt.time(5, 59))
    assert not p.in_window(dt.time(6, 0)) and not p.in_window(dt.time(21, 59))
    assert p.seconds_until_window(dt.datetime(2026, 1, 1, 21, 0)) == 3600
    assert p.seconds_until_window(dt.datetime(2026, 1, 1, 7, 0)) == 15 * 3600
    assert p.seconds_until_window(NIGHT) == 0
    day = TrainingPolicy(window_start=dt.time(9), window_end=dt.time(17))
    assert day.in_window(dt.time(12)) and not day.in_window(dt.time(18))


def test_emulated_conditions_follow_their_owner():
    now = [NIGHT]
    c = EmulatedConditions(lambda: now[0])
    assert TrainingPolicy().blockers(c.read()) == []
    c.charging = False
    now[0] = NIGHT + dt.timedelta(hours=8)
    assert TrainingPolicy().blockers(c.read()) == ["unplugged", "outside_window"]


def fake_host(tmp_path, supplies: dict[str, dict[str, str]], route_iface: str | None, load: str):
    for name, files in supplies.items():
        d = tmp_path / "sys/class/power_supply" / name
        d.mkdir(parents=True)
        for f, v in files.items():
            (d / f).write_text(v + "\n")
    (tmp_path / "proc/net").mkdir(parents=True)
    header = "Iface\tDestination\tGateway\tFlags\n"
    rows = f"{route_iface}\t00000000\t0101A8C0\t0003\n" if route_iface else ""
    (tmp_path / "proc/net/route").write_text(header + "lo\t0000007F\t00000000\t0001\n" + rows)
    (tmp_path / "proc/loadavg").write_text(f"{load} 0.1 0.1 1/100 1\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8000000 kB\nMemAvailable: 3145728 kB\n")
    return LinuxConditions(root=tmp_path, idle_load_per_core=0.5)


def test_linux_conditions_read_a_laptop_on_battery(tmp_path):
    host = fake_host(tmp_path, {"AC": {"type": "Mains", "online": "0"},
                                "BAT0": {"type": "Battery", "status": "Discharging", "capacity": "42"}},
                     "wlan0", "0.00")
    c = host.read()
    assert (c.charging, c.battery, c.idle, c.unmetered, c.free_memory_mb) == (False, 0.42, True, True, 3072)


def test_linux_conditions_read_a_charging_laptop_on_cellular(tmp_path):
    host = fake_host(tmp_path, {"AC": {"type": "Mains", "online": "1"},
                                "BAT0": {"type": "Battery", "status": "Charging", "capacity": "90"}},
                     "wwan0", "99.0")
    c = host.read()
    assert (c.charging, c.battery, c.idle, c.unmetered) == (True, 0.9, False, False)


def test_linux_conditions_without_battery_or_route(tmp_path):
    c = fake_host(tmp_path, {}, None, "0.0").read()
    assert (c.charging, c.battery, c.unmetered) == (True, 1.0, False)


@pytest.mark.parametrize("iface, unmetered", [("wlan0", True), ("rmnet_data0", False), ("lo", False)])
def test_linux_conditions_find_an_ipv6_only_default_route(tmp_path, iface, unmetered):
    host = fake_host(tmp_path, {}, None, "0.0")
    zeros, gateway = "0" * 32, "fe80" + "0" * 27 + "1"
    (tmp_path / "proc/net/ipv6_route").write_text(
        f"fe80{zeros[4:]} 40 {zeros} 00 {zeros} 00000100 00000001 00000000 00000001 eth9\n"
        f"{zeros} 00 {zeros} 00 {gateway} 00000400 00000002 00000000 00000003 {iface}\n")
    assert host.read().unmetered is unmetered


def test_linux_conditions_on_this_host():
    c = LinuxConditions().read()
    assert 0.0 <= c.battery <= 1.0 and c.free_memory_mb > 0


def test_example_store_keeps_text_and_applies_retention(tmp_path):
    store = ExampleStore(tmp_path / "ex.db", Retention(max_age_s=100, max_count=3))
    for i in range(5):
        store.add(f"text {i}", timestamp=1000 + i)
    store.add("   ", timestamp=1010)            # blank text is not an example
    assert store.count() == 5
    assert store.texts(now=1050) == ["text 2", "text 3", "text 4"]   # count cap
    assert store.texts(now=1104) == ["text 4"]                        # age cap
    store.close()
    reopened = ExampleStore(tmp_path / "ex.db")
    assert reopened.count() == 1
    reopened.clear()
    assert reopened.texts() == []
    with pytest.raises(TypeError):
        reopened.add(b"bytes")


def test_opstats_is_bounded_and_knows_the_last_success(tmp_path):
    log = OpStats(tmp_path / "ops.db", max_rows=5)
    log.log(10, "task", "completed", seconds=3.5, bytes_out=100)
    for i in range(6):
        log.log(20 + i, "checkin", "rejected", reason="no_round")
    assert len(log.events()) == 5
    assert log.last_success() is None            # the completed task was pushed out
    log.log(40, "task", "completed")
    assert log.last_success() == 40
    assert log.events(1)[0] == {"ts": 40, "kind": "task", "outcome": "completed"}
    assert log.summary() == {"checkin/rejected": 4, "task/completed": 1}


class _Flaky(http.server.BaseHTTPRequestHandler):
    script: list[int] = []

    def do_GET(self):
        code = self.script.pop(0) if self.script else 200
        body = b'{"ok": true}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_transport_retries_503_with_bounded_jittered_backoff(flaky_server):
    _Flaky.script = [503, 503, 200]
    slept = []
    t = Transport(f"http://127.0.0.1:{flaky_server.server_port}",
                  RetryPolicy(attempts=4, base_delay_s=1.0, max_delay_s=1.5), sleep=slept.append, seed=1)
    assert t.request("GET", "/x").status_code == 200
    assert len(slept) == 2 and 0 <= slept[0] <= 1.0 and 0 <= slept[1] <= 1.5
    _Flaky.script = [404]
    assert t.request("GET", "/x").status_code == 404     # a 4xx is an answer, not retried
    assert len(slept) == 2
    _Flaky.script = [503] * 10
    with pytest.raises(ServerUnavailable, match="HTTP 503"):
        t.request("GET", "/x")


def test_transport_gives_up_on_connection_errors_within_bounds():
    slept = []
    t = Transport("http://127.0.0.1:9", RetryPolicy(attempts=3, timeout_s=1), sleep=slept.append)
    with pytest.raises(ServerUnavailable, match="failed 3 times"):
        t.request("GET", "/")
    assert len(slept) == 2


def test_transport_honours_retry_after_within_its_cap(flaky_server):
    class WithRetryAfter(_Flaky):
        def end_headers(self):
            self.send_header("Retry-After", "7")
            super().end_headers()

    flaky_server.RequestHandlerClass = WithRetryAfter
    _Flaky.script = [503, 503, 200]
    slept = []
    t = Transport(f"http://127.0.0.1:{flaky_server.server_port}",
                  RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=10.0), sleep=slept.append)
    assert t.request("GET", "/x").status_code == 200
    assert slept == [7.0, 7.0]
    _Flaky.script = [503, 200]
    t.retry = RetryPolicy(attempts=2, base_delay_s=0.1, max_delay_s=2.0)
    t.request("GET", "/x")
    assert slept[-1] == 2.0                              # never beyond the cap


class _Artifacts(http.server.BaseHTTPRequestHandler):
    """Serves one artifact: the bodies in `script` first, then `good`."""

    good = b"the real plan bytes"
    script: list[bytes] = []
    gets = 0

    def do_GET(self):
        type(self).gets += 1
        body = self.script.pop(0) if self.script else self.good
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_artifact_cache_refuses_a_corrupt_download_and_fetches_again(flaky_server, tmp_path):
    flaky_server.RequestHandlerClass = _Artifacts
    ref = {"url": "/v1/artifacts/x", "sha256": hashlib.sha256(_Artifacts.good).hexdigest()}
    cache = ArtifactCache(tmp_path / "cache", Transport(f"http://127.0.0.1:{flaky_server.server_port}"))
    _Artifacts.script, _Artifacts.gets = [b"the real plan bytez", b"truncated"], 0
    path = cache.get(ref)
    assert path.read_bytes() == _Artifacts.good and _Artifacts.gets == 3
    assert cache.get(ref) == path and _Artifacts.gets == 3          # cached, verified, not fetched
    path.write_bytes(b"bit rot")
    assert cache.get(ref).read_bytes() == _Artifacts.good and _Artifacts.gets == 4
    _Artifacts.script = [b"wrong"] * 3
    with pytest.raises(CorruptDownload, match="3 downloads"):
        cache.get({"url": "/v1/artifacts/y", "sha256": "0" * 64})
    assert sorted(p.name for p in cache.root.iterdir()) == [ref["sha256"]]


def test_artifact_cache_keeps_within_its_byte_budget_least_recently_used_first(flaky_server, tmp_path):
    flaky_server.RequestHandlerClass = _Artifacts
    cache = ArtifactCache(tmp_path / "cache", Transport(f"http://127.0.0.1:{flaky_server.server_port}"),
                          max_bytes=250)
    bodies = [bytes([i]) * 100 for i in range(4)]
    refs = [{"url": f"/a/{i}", "sha256": hashlib.sha256(b).hexdigest()} for i, b in enumerate(bodies)]
    _Artifacts.script = list(bodies[:2])
    cache.get(refs[0]), cache.get(refs[1])
    os.utime(cache.path(refs[1]["sha256"]), (1, 1))     # 1 is now older than 0
    _Artifacts.script = [bodies[2]]
    cache.get(refs[2])
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(r["sha256"] for r in (refs[0], refs[2]))


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        body = b"<html>503 Service Unavailable</html>"
        self.send_response(503)
        self.send_header("Retry-After", "3")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["nothing listening", "503"])
def test_a_device_step_survives_an_unreachable_or_failing_server(flaky_server, tmp_path, server):
    if server == "503":
        flaky_server.RequestHandlerClass = _Unavailable
        url = f"http://127.0.0.1:{flaky_server.server_port}"
    else:
        url = f"http://127.0.0.1:{free_port()}"
    slept: list[float] = []
    transport = Transport(url, RetryPolicy(attempts=3, base_delay_s=0.5, max_delay_s=4.0, timeout_s=5),
                          sleep=slept.append)
    device = Device(tmp_path / "d", url, EmulatedConditions(lambda: NIGHT), settings=DeviceSettings("en"),
                    transport=transport, seed=1,
                    enrollment=Enrollment("credential", KeyAttester(Ed25519PrivateKey.generate())))
    device.examples.add("the king doth speak to the hall.")
    for _ in range(2):
        wait = device.step()
        assert 600 <= wait <= 1200                       # unavailable_retry_s
    events = device.opstats.events()
    errors = [e for e in events if e["kind"] == "checkin"]
    assert [e["outcome"] for e in errors] == ["error", "error"], events
    assert "failed 3 times" in errors[0]["error"]
    assert ("HTTP 503" if server == "503" else "ConnectionError") in errors[0]["error"]
    assert len(slept) <= 2 * 2 * 2 and all(0 <= s <= 4.0 for s in slept)   # (app model + register) x 2
    if server == "503":
        assert all(s == 3.0 for s in slept)               # its Retry-After
    assert not (device.dir / "identity.json").exists()
    device.close()
