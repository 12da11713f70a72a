"""One device against the real server on loopback: a full task, and what it uploads."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

from device_runtime.conditions import EmulatedConditions
from device_runtime.runtime import Device, DeviceSettings
from device_runtime.training import Hyperparameters, local_windows, train_locally
from models.weights import load_checkpoint
from tests.e2e import REPO, start_server, tiny_corpus, tiny_model
from tflite_export.reader import load_plan

NIGHT = dt.datetime(2026, 11, 23, 23, 30)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model)
    try:
        yield corpus, model, server
    finally:
        server.kill()


def night_device(tmp_path, server, corpus, client_index=0, **conditions) -> Device:
    device = Device(tmp_path / f"device{client_index}", server.url,
                    EmulatedConditions(lambda: NIGHT, **conditions), settings=DeviceSettings("en"))
    for text in list(corpus.train_texts.values())[client_index]:
        device.examples.add(text)
    return device


def test_device_completes_a_task_and_uploads_exactly_the_plans_delta(world, tmp_path):
    corpus, model, server = world
    device = night_device(tmp_path, server, corpus)
    seen = []
    checkin = device.client.checkin
    device.client.checkin = lambda *a, **k: seen.append(checkin(*a, **k)) or seen[-1]
    device.step()
    assert seen, device.opstats.events()
    assignment = seen[0]
    assert assignment.task == "train", assignment
    events = device.opstats.events()
    assert events[0]["kind"] == "task" and events[0]["outcome"] == "completed", events

    # The server's new version (one report, plain SGD with lr 1) is initial + the device's delta.
    versions = requests.get(f"{server.url}/v1/populations/en/versions", timeout=10).json()["versions"]
    v1 = next(v for v in versions if v["version"] == 1)
    blob = requests.get(f"{server.url}/v1/artifacts/{v1['checkpoint_sha256']}", timeout=10).content
    (tmp_path / "v1.safetensors").write_bytes(blob)
    _, v1_flat, _ = load_checkpoint(tmp_path / "v1.safetensors")

    plan = load_plan(model.plan_dir / "plan.manifest.json")
    hp = assignment.hyperparameters
    direct = train_locally(plan, model.flat, local_windows(plan, device.examples.texts()),
                           Hyperparameters(hp["learning_rate"], hp["epochs"], hp["batch_size"],
                                           hp["seed"], hp["max_examples"]))
    np.testing.assert_allclose(v1_flat - model.flat, direct.delta, atol=1e-6)
    assert np.abs(direct.delta).max() > 1e-3
    assert events[0]["examples"] == direct.num_examples
    for key in ("download_s", "train_s", "upload_s", "bytes_in", "bytes_out"):
        assert events[0][key] >= 0
    device.close()


def test_the_runtime_never_imports_tensorflow(world, tmp_path):
    corpus, model, server = world
    script = textwrap.dedent(f"""
        import datetime as dt, sys
        from device_runtime.conditions import EmulatedConditions
        from device_runtime.runtime import Device, DeviceSettings
        d = Device({str(tmp_path / 'notf')!r}, {server.url!r},
                   EmulatedConditions(lambda: dt.datetime(2026, 11, 23, 23, 30)),
                   settings=DeviceSettings("en"))
        for t in {list(corpus.train_texts.values())[1]!r}:
            d.examples.add(t)
        d.step()
        outcome = d.opstats.events()[0]
        assert outcome["kind"] == "task", outcome
        assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if "tensorflow" in m)
        print("OK", outcome["outcome"])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK"), done.stdout
