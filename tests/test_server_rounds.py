"""The round lifecycle, driven through the service classes with a manual clock (no Flask)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from server.tasks.train import Upload
from contract.update.pipeline import UpdatePipeline
from contract.protocol.wire import Conditions, EvalReport
from tests.server_fixtures import ELIGIBLE


class Dev:
    """A device talking to the services directly."""

    def __init__(self, env):
        self.env = env
        reg = env.services.registry.register(env.population)
        self.auth = f"Bearer {reg.device_id}:{reg.secret}"
        self.assignment = None

    @property
    def id(self):
        return self.auth.split()[1].split(":")[0]

    def checkin(self, **conditions):
        svc = self.env.services
        device = svc.registry.authenticate(self.auth)
        result = svc.checkin.checkin(device, self.env.population,
                                     Conditions.from_json({**ELIGIBLE, **conditions}))
        if hasattr(result, "session_id"):
            self.assignment = result
        return result

    def upload(self, delta, num_examples=10, metrics=None, model_version=None):
        a = self.assignment
        encoded = UpdatePipeline(a.update).encode(delta, num_examples, a.hyperparameters["seed"])
        version = a.model_version if model_version is None else model_version
        return self.env.services.reporting.report(
            self.id, a.session_id, "train", Upload(encoded.body, version, encoded.weight, metrics or {}))

    def evaluate(self, top1, top3, positions):
        a = self.assignment
        return self.env.services.reporting.report(self.id, a.session_id, "eval",
                                                  EvalReport(a.model_version, top1, top3, positions))

    def fail(self, reason="unplugged"):
        return self.env.services.reporting.failure(self.id, self.assignment.session_id, reason)


def devices(env, n):
    return [Dev(env) for _ in range(n)]


def rounds(env):
    return env.services.analytics.list(env.population, env.clock.now(), limit=100)[::-1]


def weights(env, version):
    svc = env.services
    return np.array(svc.versions.weights(svc.versions.get(env.population, version)))


def deltas(env, n, seed=0):
    return np.random.default_rng(seed).normal(0, 0.01, (n, env.layout.size)).astype(np.float32)


def test_goal_reached_early_completes_round_and_aborts_the_over_selected(server_env):
    env = server_env
    devs = devices(env, 7)
    results = [d.checkin() for d in devs]
    assert [hasattr(r, "session_id") for r in results] == [True] * 6 + [False]   # goal 4 x 1.5
    assert results[6].reason == "round_full"
    d = deltas(env, 6)
    counts = [3, 10, 20, 7]
    for i in range(4):
        assert devs[i].upload(d[i], counts[i], metrics={"loss": float(i)}).status == "accepted"
    summary = rounds(env)[0]
    assert summary["state"] == "completed" and summary["result_version"] == 1
    expected = env.flat + np.average(d[:4], axis=0, weights=counts)      # sgd, lr 1: w - (-mean)
    np.testing.assert_allclose(weights(env, 1), expected, rtol=1e-5, atol=1e-6)
    for i in (4, 5):
        out = devs[i].upload(d[i])
        assert (out.status, out.reason) == ("aborted", "round_closed")
    detail = env.services.analytics.detail(env.population, 1, env.clock.now())
    assert (detail["selected"], detail["reported"], detail["aborted"], detail["dropped"]) == (6, 4, 2, 0)
    assert detail["bytes_in"] == sum(dev["bytes_in"] for dev in detail["devices"]) > 0
    version = env.services.versions.get(env.population, 1)
    assert version.parent == 0 and version.round_number == 1 and version.train["reports"] == 4
    assert version.train["loss"] == pytest.approx(np.average([0, 1, 2, 3], weights=counts))


def test_deadline_with_enough_reports_completes_and_late_report_is_aborted(server_env):
    env = server_env
    devs = devices(env, 3)
    for dev in devs:
        dev.checkin()
    env.clock.advance(61)                      # selection window over with 3 >= min 2
    d = deltas(env, 3)
    assert devs[0].upload(d[0]).status == "accepted"
    assert devs[1].upload(d[1]).status == "accepted"
    assert rounds(env)[0]["state"] == "reporting"
    env.clock.advance(300)                     # deadline: 2 reports >= min 2
    env.services.tick()
    summary = rounds(env)[0]
    assert summary["state"] == "completed" and summary["dropped"] == 1
    np.testing.assert_allclose(weights(env, 1), env.flat + d[:2].mean(0), rtol=1e-5, atol=1e-6)
    out = devs[2].upload(d[2])
    assert (out.status, out.reason) == ("aborted", "late")
    summary = rounds(env)[0]
    assert (summary["aborted"], summary["dropped"]) == (1, 0)


def test_deadline_with_too_few_reports_fails_and_is_retried(server_env):
    env = server_env
    devs = devices(env, 3)
    for dev in devs:
        dev.checkin()
    env.clock.advance(61)
    assert devs[0].upload(deltas(env, 1)[0]).status == "accepted"
    env.clock.advance(300)
    env.services.tick()
    first = rounds(env)[0]
    assert (first["state"], first["reason"]) == ("failed", "too_few_reports")
    assert env.services.versions.list(env.population)[0].version == 0          # no new version
    assert not list((env.root / "private" / "partials").glob("*/*.i64"))       # sum files removed
    assert not env.services.store.connection().execute("SELECT * FROM partials").fetchall()  # and rows
    result = devs[1].checkin()
    assert result.round == 2 and result.model_version == 0
    assert rounds(env)[-1]["attempt"] == 2


def test_too_few_selected_fails_the_round(server_env):
    env = server_env
    dev = devices(env, 1)[0]
    dev.checkin()
    env.clock.advance(61)
    env.services.tick()
    assert (rounds(env)[0]["state"], rounds(env)[0]["reason"]) == ("failed", "too_few_selected")
    out = dev.upload(deltas(env, 1)[0])
    assert (out.status, out.reason) == ("aborted", "round_closed")


def test_duplicate_uploads_are_idempotent_even_when_concurrent(server_env):
    env = server_env
    devs = devices(env, 4)
    for dev in devs:
        dev.checkin()
    d = deltas(env, 4)
    first = devs[0].upload(d[0], 5)
    again = devs[0].upload(d[0] * 100, 5)            # a retry (even with other bytes) counts once
    assert (first.status, again.status, again.reason) == ("accepted", "accepted", "duplicate")
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(devs[1].upload(d[1], 5))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.counted for o in outcomes) == 1 and {o.status for o in outcomes} == {"accepted"}
    assert rounds(env)[0]["reported"] == 2
    for i in (2, 3):
        devs[i].upload(d[i], 5)
    np.testing.assert_allclose(weights(env, 1), env.flat + d.mean(0), rtol=1e-5, atol=1e-6)


def test_concurrent_uploads_of_many_devices_sum_exactly(make_server):
    env = make_server(goal=12, over_selection=1.0)
    devs = devices(env, 12)
    for dev in devs:
        dev.checkin()
    d = deltas(env, 12)
    counts = list(range(1, 13))
    threads = [threading.Thread(target=dev.upload, args=(d[i], counts[i])) for i, dev in enumerate(devs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rounds(env)[0]["state"] == "completed"
    np.testing.assert_allclose(weights(env, 1), env.flat + np.average(d, axis=0, weights=counts),
                               rtol=1e-5, atol=1e-6)


def test_failures_are_counted_and_end_the_round_when_nobody_is_left(server_env):
    env = server_env
    devs = devices(env, 3)
    for dev in devs:
        dev.checkin()
    env.clock.advance(61)
    d = deltas(env, 3)
    devs[0].upload(d[0])
    devs[1].upload(d[1])
    assert devs[2].fail("out_of_time").status == "recorded"
    assert devs[2].fail("out_of_time").status == "recorded"       # idempotent
    detail = env.services.analytics.detail(env.population, 1, env.clock.now())
    assert detail["state"] == "completed" and detail["failed"] == 1
    assert detail["failure_reasons"] == {"out_of_time": 1}


def test_server_momentum_state_carries_over_rounds(make_server):
    env = make_server(goal=2, over_selection=1.0, server_optimizer="sgdm", server_lr=0.5,
                      server_momentum=0.9)
    expected, velocity = env.flat.copy(), np.zeros_like(env.flat)
    for r in range(3):
        devs = devices(env, 2)
        for dev in devs:
            assert dev.checkin().model_version == r
        d = deltas(env, 2, seed=r)
        devs[0].upload(d[0], 1)
        devs[1].upload(d[1], 3)
        velocity = np.float32(0.9) * velocity - np.average(d, axis=0, weights=[1, 3]).astype(np.float32)
        expected = expected - np.float32(0.5) * velocity
    np.testing.assert_allclose(weights(env, 3), expected, rtol=1e-5, atol=1e-6)


def test_evaluation_rounds_publish_when_not_worse_and_rollback(make_server):
    env = make_server(goal=2, over_selection=1.0, eval_every=1, publish_every=1)
    svc = env.services

    def train_round(seed):
        devs = devices(env, 2)
        for dev in devs:
            assert dev.checkin().task == "train"
        for i, dev in enumerate(devs):
            dev.upload(deltas(env, 2, seed)[i])

    def eval_round(top3):
        devs = devices(env, 2)
        for dev in devs:
            assert dev.checkin().task == "eval"
        for dev in devs:
            assert dev.evaluate(top3 // 2, top3, 100).status == "accepted"

    train_round(0)
    eval_round(30)                       # version 1: first evaluation → publish
    assert svc.publisher.run_pending() == 1
    assert svc.versions.published(env.population).version == 1
    assert svc.versions.get(env.population, 1).eval["top3"] == pytest.approx(0.3)
    train_round(1)
    eval_round(20)                       # version 2 is worse: not published
    assert svc.publisher.run_pending() == 0
    train_round(2)
    eval_round(40)                       # version 3 better: published
    assert svc.publisher.run_pending() == 1
    assert svc.versions.published(env.population).version == 3
    assert [c[2] for c in env.exporter.calls] == [1, 3]
    assert svc.versions.rollback(env.population).version == 1
    assert svc.versions.published(env.population).version == 1
    assert svc.versions.rollback(env.population, 3).version == 3
    published = svc.versions.published(env.population)
    assert svc.artifacts.verify(published.app_manifest_sha256)


def test_failed_export_is_retried_then_given_up(make_server):
    env = make_server(goal=1, over_selection=1.0, eval_every=1, publish_every=1)
    env.exporter.fail = True
    dev = Dev(env)
    dev.checkin()
    dev.upload(deltas(env, 1)[0])
    dev2 = Dev(env)
    dev2.checkin()
    dev2.evaluate(1, 2, 10)
    assert [env.services.publisher.run_pending() for _ in range(4)] == [0, 0, 0, 0]
    assert len(env.exporter.calls) == 3       # MAX_ATTEMPTS, then the job is marked failed
    env.exporter.fail = False


def test_pace_steering_windows(make_server):
    env = make_server(goal=2, over_selection=1.0, selection_window_s=60.0,
                      eligibility={"min_separation_s": 0.0, "min_free_memory_mb": 0, "min_battery": 0.5})
    low = Dev(env).checkin(battery=0.1, charging=False)
    assert low.reason == "ineligible" and set(low.criteria) == {"charging", "min_battery"}
    assert (low.retry_min_s, low.retry_max_s) == (720.0, 1080.0)          # 15 min +- 20%
    devs = devices(env, 40)
    devs[0].checkin()
    devs[1].checkin()
    env.services.checkin._device_count = (0.0, 0)                       # drop the cached count
    full = devs[2].checkin()
    assert full.reason == "round_full"
    assert full.retry_min_s == pytest.approx(360.0)                     # until the deadline
    # 41 devices, 2 needed per round: spread = 41 * 60 / (2 * 2) = 615 s
    assert full.retry_max_s - full.retry_min_s == pytest.approx(615.0)


def test_min_separation_uses_the_servers_participation_record(make_server):
    env = make_server(goal=1, over_selection=1.0,
                      eligibility={"min_separation_s": 3600.0, "min_free_memory_mb": 0})
    dev = Dev(env)
    dev.checkin()
    assert dev.upload(deltas(env, 1)[0]).status == "accepted"
    env.clock.advance(600)
    again = dev.checkin()
    assert again.reason == "ineligible" and again.criteria == ("min_separation",)
    assert again.retry_min_s == pytest.approx(3000.0)
    env.clock.advance(3000)
    assert dev.checkin().round == 2
