"""Devices against the real server on loopback: a full task, what it uploads, the retry window,
a corrupt download, the memory budget, and the `run` command."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

from contract.update.pipeline import UpdatePipeline, aggregate
from contract.update.spec import UpdateSpec
from contract.protocol.wire import Conditions
from device_runtime.client import Assignment, Rejection, ServerClient
from device_runtime.runtime import DeviceSettings
from device_runtime.transport import Transport
from emulation.deployment import REPO, enrollment
from server.config import load_config
from tests.device_world import (direct_delta, night_device, record_checkins, record_uploads,
                                round_detail, server_weights, task_events, texts_of)
from tests.e2e import tiny_world
from tests.server_fixtures import ELIGIBLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("e2e")) as world:
        yield world


def test_device_completes_a_task_and_uploads_exactly_the_plans_delta(world, tmp_path):
    corpus, model, server = world
    device = night_device(tmp_path / "d", server, texts_of(corpus, [0]))
    seen = record_checkins(device)
    device.step()
    assert seen, device.opstats.events()
    assignment = seen[0]
    assert assignment.task == "train", assignment
    events = task_events(device)
    assert events[0]["outcome"] == "completed", events

    # The server's new version (one report, plain SGD with lr 1) is initial + the device's delta,
    # as the round's update pipeline (the default: 8 bits, clipped, capped) encodes and decodes it.
    versions = requests.get(f"{server.url}/v1/populations/en/versions", timeout=10,
                            headers=server.operator_headers).json()["versions"]
    v1 = next(v for v in versions if v["version"] == 1)
    v1_flat = server_weights(server, v1["checkpoint_sha256"], tmp_path)
    direct = direct_delta(model.plan_dir, model.flat, device.examples.texts(), assignment)
    pipeline = UpdatePipeline(assignment.update)
    assert assignment.update.spec == UpdateSpec()                      # a new population's default
    encoded = pipeline.encode(direct.delta, direct.num_examples, assignment.hyperparameters["seed"])
    np.testing.assert_allclose(v1_flat - model.flat, aggregate(pipeline, [(encoded.body, encoded.weight)]),
                               atol=1e-7)
    step = np.abs(direct.delta).max() / 127
    np.testing.assert_allclose(v1_flat - model.flat, direct.delta, atol=4 * step)   # 8 bits of it
    assert np.abs(direct.delta).max() > 1e-3
    assert events[0]["examples"] == direct.num_examples
    for key in ("download_s", "prepare_s", "train_s", "upload_s", "bytes_in", "bytes_out"):
        assert events[0][key] >= 0
    assert len(encoded.body) < direct.delta.nbytes / 3.5      # about a quarter of float32 (+ header)
    assert events[0]["bytes_out"] >= len(encoded.body) and events[0]["bytes_in"] > 0
    device.close()


def test_the_runtime_never_imports_tensorflow(world, tmp_path):
    corpus, model, server = world
    enrollment_file = str(load_config(server.config).enrollment_path("en"))
    script = textwrap.dedent(f"""
        import datetime as dt, sys
        from device_runtime.conditions import EmulatedConditions
        from device_runtime.enrollment import Enrollment
        from device_runtime.runtime import Device, DeviceSettings
        d = Device({str(tmp_path / 'notf')!r}, {server.url!r},
                   EmulatedConditions(lambda: dt.datetime(2026, 11, 23, 23, 30)),
                   settings=DeviceSettings("en"), enrollment=Enrollment.from_file({enrollment_file!r}))
        for t in {texts_of(corpus, [1])!r}:
            d.examples.add(t)
        d.step()
        outcome = [e for e in d.opstats.events() if e["kind"] == "task"][0]
        assert outcome["outcome"] == "completed", outcome
        assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if "tensorflow" in m)
        print("OK", outcome["outcome"])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK"), done.stdout


def hold_the_round(server) -> tuple[ServerClient, Assignment]:
    """Another device takes the round's only seat (goal 1), so check-ins meet round_full."""
    holder = ServerClient(Transport(server.url))
    holder.authenticate(*holder.register("en", enrollment(server.config, "en")))
    assignment = holder.checkin("en", Conditions(**ELIGIBLE))
    assert isinstance(assignment, Assignment), assignment
    return holder, assignment


def test_step_waits_within_every_retry_window_the_server_sends(world, tmp_path):
    corpus, model, server = world
    holder, held = hold_the_round(server)
    try:
        device = night_device(tmp_path / "d", server, texts_of(corpus, [2]), seed=3)
        seen = record_checkins(device)
        waits = [device.step() for _ in range(6)]
        assert len(seen) == 6 and all(isinstance(r, Rejection) for r in seen), seen
        for wait, rejection in zip(waits, seen):
            assert rejection.reason == "round_full"
            assert rejection.retry_min_s <= wait <= rejection.retry_max_s, (wait, rejection)
        assert len(set(waits)) > 1   # drawn from the window, not its edge
        logged = [e for e in device.opstats.events() if e["kind"] == "checkin"]
        assert [e["outcome"] for e in logged] == ["rejected"] * 6
        assert logged[0]["retry_max_s"] == seen[-1].retry_max_s
        assert not task_events(device)
        device.close()
    finally:
        holder.report_failure(held, "cancelled")


class CorruptingTransport(Transport):
    """Delivers every artifact with its first byte flipped (a broken proxy, a bad disk)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.artifact_gets: dict[str, int] = {}

    def request(self, method, path, **kwargs):
        resp = super().request(method, path, **kwargs)
        if path.startswith("/v1/artifacts/") and resp.status_code == 200:
            self.artifact_gets[path] = self.artifact_gets.get(path, 0) + 1
            resp._content = bytes([resp.content[0] ^ 0xFF]) + resp.content[1:]
        return resp


def test_a_persistently_corrupt_download_is_reported_as_an_error_and_nothing_crashes(world, tmp_path):
    corpus, model, server = world
    transport = CorruptingTransport(server.url)
    device = night_device(tmp_path / "d", server, texts_of(corpus, [3]), transport=transport)
    seen, sent = record_checkins(device), record_uploads(device)
    wait = device.step()
    assert wait > 0 and not sent
    assert list(transport.artifact_gets.values()) == [device.cache.max_fetches]   # then gave up
    event = task_events(device)[0]
    assert (event["outcome"], event["reason"], event["reported"]) == ("error", "error", True)
    assert "CorruptDownload" in event["detail"]
    assert not any(device.cache.root.iterdir())           # nothing unverified was kept
    detail = round_detail(server, seen[0].round)
    mine = next(d for d in detail["devices"] if d["session_id"] == seen[0].session_id)
    assert mine["outcome"] == "failed" and mine["reason"].startswith("error")
    device.close()


def test_a_task_too_big_for_the_memory_budget_is_refused_before_the_plan_is_downloaded(world, tmp_path):
    corpus, model, server = world
    device = night_device(tmp_path / "d", server, texts_of(corpus, [4]),
                          settings=DeviceSettings("en", task_memory_budget_mb=1.0))
    seen, sent = record_checkins(device), record_uploads(device)
    device.step()
    event = task_events(device)[0]
    assert (event["outcome"], event["reason"]) == ("interrupted", "out_of_memory")
    assert "needs ~" in event["detail"] and not sent
    plan_sha = seen[0].plan["sha256"]
    assert not device.cache.path(plan_sha).exists() and not (device.dir / "plans").exists()
    assert event["bytes_in"] < 10_000                      # the manifest only
    detail = round_detail(server, seen[0].round)
    assert detail["failure_reasons"] == {"out_of_memory": 1}
    device.close()


def test_the_device_keeps_its_own_minimum_separation(world, tmp_path):
    corpus, model, server = world
    device = night_device(tmp_path / "d", server, texts_of(corpus, [5]),
                          settings=DeviceSettings("en", min_separation_s=3600))
    device.step()
    assert task_events(device)[0]["outcome"] == "completed"
    seen = record_checkins(device)
    wait = device.step()
    assert not seen and 3500 < wait <= 3600        # no check-in: it knows it is too early
    device.close()


def test_the_run_command_trains_against_a_real_server_and_status_shows_it(world, tmp_path):
    corpus, model, server = world
    data = tmp_path / "phone"
    cli = [sys.executable, "-m", "device_runtime"]
    added = subprocess.run(cli + ["add", "--data", str(data), *texts_of(corpus, [6])], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    enrollment_file = str(load_config(server.config).enrollment_path("en"))
    done = subprocess.run(cli + ["run", "--server", server.url, "--data", str(data), "--population", "en",
                                 "--enrollment", enrollment_file, "--emulated", "--window", "00:00-00:00", "--max-steps", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and "task      completed" in lines[1], done.stdout
    status = subprocess.run(cli + ["status", "--data", str(data)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "task      completed" in status.stdout and "examples stored: 12" in status.stdout


def test_the_memory_estimate_covers_what_training_the_plan_really_takes(world):
    corpus, model, server = world
    script = textwrap.dedent(f"""
        import numpy as np
        from device_runtime.task import estimated_task_memory_mb
        from contract.artifacts.manifest import read_manifest
        from tflite_export.reader import load_plan

        def mib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status")
                        if l.startswith(field + ":")) / 1024

        path = {str(model.plan_dir / "plan.manifest.json")!r}
        rss, hwm = mib("VmRSS"), mib("VmHWM")
        plan = load_plan(path, num_threads=1)
        windows = np.random.default_rng(0).integers(4, 24, (16, 21)).astype(np.int32)
        for _ in range(3):
            plan.train_windows(windows, 0.1)
        plan.set_weights(plan.get_weights())
        grew = max(mib("VmRSS") - rss, mib("VmHWM") - hwm)
        print(grew, estimated_task_memory_mb(read_manifest(path), 16, 1))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    grew, estimate = map(float, done.stdout.split())
    assert 0 < grew <= estimate < 4 * grew + 16, (grew, estimate)


def test_a_device_the_server_does_not_know_registers_again(world, tmp_path):
    corpus, model, server = world
    device = night_device(tmp_path / "d", server, texts_of(corpus, [7]))
    (device.dir / "identity.json").write_text('{"device_id": "d-gone", "secret": "x"}')
    wait = device.step()
    error = device.opstats.events(1)[0]
    assert (error["kind"], error["outcome"]) == ("checkin", "error") and "401" in error["error"]
    assert 600 <= wait <= 1200 and not (device.dir / "identity.json").exists()
    device.step()
    assert task_events(device)[0]["outcome"] == "completed"
    device.close()
