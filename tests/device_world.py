"""Helpers of the device runtime's end-to-end tests: a device at night, its check-ins, the server's view.

Everything is real (emulation.models, emulation.deployment): the TINY plan
exported by tflite_export, the server under gunicorn on loopback; a test only
chooses the device's conditions, clock and texts, and reads the round analytics.
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import requests

from device_runtime.client import Assignment, Rejection
from device_runtime.conditions import EmulatedConditions
from device_runtime.runtime import Device, DeviceSettings
from device_runtime.training import Hyperparameters, local_windows, train_locally
from emulation.deployment import enrollment
from models.corpus import FederatedCorpus
from contract.model.weights import load_checkpoint
from tflite_export.reader import load_plan

NIGHT = dt.datetime(2026, 11, 23, 23, 30)
MORNING = dt.datetime(2026, 11, 24, 6, 30)


def texts_of(corpus: FederatedCorpus, clients: range | list[int]) -> list[str]:
    """The training texts of some clients of `corpus`, as one phone's store."""
    values = list(corpus.train_texts.values())
    return [t for i in clients for t in values[i]]


def night_device(root: Path, server, texts: list[str], now=None, settings=None, **kwargs) -> Device:
    """A device in population "en" of `server` (a ServerProcess), enrolled with its app credential,
    charging, idle on Wi-Fi at 23:30, holding `texts`."""
    conditions = kwargs.pop("conditions", None) or EmulatedConditions(now or (lambda: NIGHT))
    kwargs.setdefault("enrollment", enrollment(server.config, "en"))
    device = Device(root, server.url, conditions, settings=settings or DeviceSettings("en"), **kwargs)
    for text in texts:
        device.examples.add(text)
    return device


def record_checkins(device: Device) -> list[Assignment | Rejection]:
    """Every answer the device gets to a check-in, in order."""
    seen: list[Assignment | Rejection] = []
    checkin = device.client.checkin
    device.client.checkin = lambda *a, **k: seen.append(checkin(*a, **k)) or seen[-1]
    return seen


def record_uploads(device: Device) -> list[tuple[Assignment, np.ndarray, int]]:
    """Every update the device uploads: (assignment, delta, num_examples)."""
    sent: list[tuple[Assignment, np.ndarray, int]] = []
    upload = device.client.upload

    def recording(assignment, delta, num_examples, metrics, masker=None):
        sent.append((assignment, np.array(delta), num_examples))
        return upload(assignment, delta, num_examples, metrics, masker)

    device.client.upload = recording
    return sent


def round_detail(server, number: int, population: str = "en") -> dict:
    """The operator's view of a round of `server` (a deploy.server_process.ServerProcess)."""
    resp = requests.get(f"{server.url}/v1/populations/{population}/rounds/{number}", timeout=10,
                        headers=server.operator_headers)
    resp.raise_for_status()
    return resp.json()


def server_weights(server, sha256: str, scratch: Path) -> np.ndarray:
    """The flat weights of a checkpoint `server` holds (fetched as the operator: unpublished
    checkpoints go only to the devices assigned to them)."""
    blob = requests.get(f"{server.url}/v1/artifacts/{sha256}", timeout=10, headers=server.operator_headers)
    blob.raise_for_status()
    path = scratch / f"{sha256}.safetensors"
    path.write_bytes(blob.content)
    return load_checkpoint(path)[1]


def direct_delta(plan_dir: Path, initial: np.ndarray, texts: list[str], assignment: Assignment):
    """The plan's own update for this assignment on `texts`, computed without the runtime."""
    plan = load_plan(plan_dir / "plan.manifest.json")
    hp = assignment.hyperparameters
    return train_locally(plan, initial, local_windows(plan, texts),
                         Hyperparameters(hp["learning_rate"], hp["epochs"], hp["batch_size"],
                                         hp["seed"], hp["max_examples"]))


def task_events(device: Device) -> list[dict]:
    """The device's task outcomes, newest first."""
    return [e for e in device.opstats.events() if e["kind"] == "task"]


def wait_for_app_model(server_url: str, timeout_s: float = 300.0) -> dict:
    """The population "en"'s published app model, once the server has published one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = requests.get(f"{server_url}/v1/populations/en/app-model", timeout=10)
        if resp.status_code == 200:
            return resp.json()
        time.sleep(0.5)
    raise AssertionError("the server published no app model in time")
