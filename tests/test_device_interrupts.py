"""A condition fails mid-training, against the real server: the device stops within one batch,
uploads nothing, tells the server why, logs it, and its next task is exact."""
from __future__ import annotations

import time

import numpy as np
import pytest

from contract.clock import ManualClock
from device_runtime.client import Assignment
from device_runtime.conditions import EmulatedConditions
from device_runtime.runtime import DeviceSettings
from tests.device_world import (MORNING, NIGHT, direct_delta, night_device,
                                record_checkins, record_uploads, round_detail, server_weights,
                                task_events, texts_of)
from tests.e2e import tiny_world
from tflite_export.reader import TrainingPlan

pytestmark = pytest.mark.slow
AFTER_BATCHES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("interrupts")) as world:
        yield world


class Phone:
    """What the test can change under a device: its conditions, its local time, its clock."""

    def __init__(self):
        self.local_time = NIGHT
        self.conditions = EmulatedConditions(lambda: self.local_time)
        self.clock = ManualClock(time.time())

    def fail(self, reason: str) -> None:
        if reason == "unplugged":
            self.conditions.charging = False
        elif reason == "metered_network":
            self.conditions.unmetered = False
        elif reason == "outside_window":
            self.local_time = MORNING
        elif reason == "out_of_time":
            self.clock.advance(3600)  # past the task's budget (and the round's deadline)
        else:
            raise ValueError(reason)

    def restore(self) -> None:
        self.conditions.charging = self.conditions.unmetered = True
        self.local_time = NIGHT


@pytest.mark.parametrize("reason", ["unplugged", "outside_window", "metered_network", "out_of_time"])
def test_a_failing_condition_stops_training_within_one_batch(world, tmp_path, monkeypatch, reason):
    corpus, model, server = world
    phone = Phone()
    texts = texts_of(corpus, range(6))              # 216 windows: 14 batches of 16
    device = night_device(tmp_path / "d", server, texts, conditions=phone.conditions,
                          clock=phone.clock, settings=DeviceSettings("en", task_time_budget_s=900))
    trained: list[int] = []
    train_windows = TrainingPlan.train_windows

    def counting(plan, windows, lr, keep=()):
        step = train_windows(plan, windows, lr, keep)
        trained.append(len(windows))
        if len(trained) == AFTER_BATCHES:
            phone.fail(reason)
        return step

    monkeypatch.setattr(TrainingPlan, "train_windows", counting)
    seen, sent = record_checkins(device), record_uploads(device)
    wait = device.step()

    assert isinstance(seen[0], Assignment) and seen[0].task == "train"
    assert AFTER_BATCHES <= len(trained) <= AFTER_BATCHES + 1, trained
    assert not sent and wait > 0
    event = task_events(device)[0]
    assert (event["outcome"], event["reason"], event["reported"]) == ("interrupted", reason, True)
    assert event["batches"] == len(trained) and "train_s" in event and "upload_s" not in event

    detail = round_detail(server, seen[0].round)
    mine = [d for d in detail["devices"] if d["session_id"] == seen[0].session_id]
    assert len(mine) == 1 and mine[0]["outcome"] == "failed", detail["devices"]
    assert mine[0]["reason"].split(":")[0] == reason
    assert detail["failure_reasons"] == {reason: 1} and detail["reported"] == 0
    assert not any(d["outcome"] == "accepted" for d in detail["devices"])

    # The local state is consistent: with conditions restored, the next task (a new round) uploads
    # exactly the plan's delta from the new checkpoint, with the plan still loaded (not fetched again).
    phone.restore()
    device.step()
    assert len(seen) == 2 and isinstance(seen[1], Assignment), seen
    assert task_events(device)[0]["outcome"] == "completed", task_events(device)
    assert task_events(device)[0]["bytes_in"] < 2 * seen[1].update.size * 4
    (assignment, delta, num_examples), = sent
    initial = server_weights(server, assignment.checkpoint["sha256"], tmp_path)
    direct = direct_delta(model.plan_dir, initial, texts, assignment)
    np.testing.assert_allclose(delta, direct.delta, atol=1e-6)
    assert num_examples == direct.num_examples == 216
    device.close()
