"""User-level DP on the real server: the adaptive clip bound into each round, the ledger, the budget.

Rounds run through the Flask app (the fixture's population: goal 4, float32
updates) with `[populations.en.dp]`; what is checked is what a device, an
operator and `privacy.accounting` see.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.dp.noise import DPSpec, adapt_clip
from privacy.accounting import Event, epsilon
from tests.server_fixtures import DeviceClient, FlaskTransport

DP = {"noise_multiplier": 0.0, "initial_clip": 0.5, "clipped_count_stddev": 0.0}
NOISY = {"noise_multiplier": 1.0, "initial_clip": 0.5, "clipped_count_stddev": 2.0}


def train_round(env, norms, devices=None):
    """One training round: a device per norm uploads a delta of that norm; the devices."""
    transport = FlaskTransport(env.client)
    devices = devices or [DeviceClient(transport, env.population, env.enrollment) for _ in norms]
    specs = []
    for device, norm in zip(devices, norms):
        reply = device.checkin()
        assert reply.status == 200 and "assignment" in reply.body, reply.body
        specs.append(device.assignment["update"])
        delta = np.ones(env.layout.size) * (norm / math.sqrt(env.layout.size))
        assert device.upload(delta, 10).body["status"] == "accepted"
    return devices, specs


def test_each_round_is_bound_to_the_adaptive_clip_and_the_mean_is_over_the_goal(make_server):
    env = make_server(dp=DP)
    norms = [0.1, 0.2, 0.9, 1.5]
    _, specs = train_round(env, norms)
    assert {s["clip_norm"] for s in specs} == {0.5} and specs[0]["weighting"] == "uniform"
    assert specs[0]["dp_mechanism"] == "central" and specs[0]["dp_denominator"] == 4
    v1 = env.services.versions.get("en", 1)
    expected = np.sum([min(n, 0.5) for n in norms]) / 4 / math.sqrt(env.layout.size)
    np.testing.assert_allclose(env.services.versions.weights(v1) - env.flat, expected, atol=1e-6)
    assert v1.train["dp_unclipped"] == 2 and v1.train["dp_clip"] == 0.5
    # what the round added, published beside the version (the round's spec: its noise and denominator)
    assert {k: v1.train[k] for k in ("dp_mechanism", "dp_stddev", "dp_denominator", "dp_count_stddev")} == {
        k: specs[0][k] for k in ("dp_mechanism", "dp_stddev", "dp_denominator", "dp_count_stddev")}
    clip = adapt_clip(0.5, 2, 4, 4, DPSpec(**DP))
    _, specs = train_round(env, norms)
    assert specs[0]["clip_norm"] == pytest.approx(clip, rel=1e-12)
    ledger = env.services.privacy.summary("en", env.services.config.population("en"))
    first, second = ledger["events"]             # q = goal / enrolled devices when the round closed
    assert (first["population_size"], first["sampling_probability"]) == (4, 1.0)
    assert (second["population_size"], second["sampling_probability"]) == (8, 0.5)
    assert second["clip"] == pytest.approx(clip) and ledger["clip"] == second["next_clip"]


def test_every_version_carries_the_ledgers_epsilon_and_the_versions_endpoint_shows_it(make_server):
    env = make_server(dp=NOISY)
    devices, _ = train_round(env, [0.3] * 4)
    train_round(env, [0.3] * 4, devices)
    want = epsilon([Event("central", 1.0, 4 / 4)] * 2, 4 ** -1.1)
    spent = env.services.privacy.spent("en", 2)
    assert spent["epsilon"] == pytest.approx(want.epsilon) and spent["accountant"] == want.accountant
    assert spent["delta"] == pytest.approx(4 ** -1.1) and spent["rounds"] == 2
    assert env.services.privacy.spent("en", 1)["epsilon"] < spent["epsilon"]
    body = env.client.get("/v1/populations/en/versions", headers=env.operator_headers).get_json()
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version[2]["dp"]["epsilon"] == pytest.approx(spent["epsilon"]) and by_version[0]["dp"] is None


def test_a_round_that_would_exceed_the_budget_never_opens(make_server):
    one = epsilon([Event("central", 1.0, 1.0)], 1e-5).epsilon
    two = epsilon([Event("central", 1.0, 1.0)] * 2, 1e-5).epsilon
    env = make_server(dp=NOISY, dp_budget={"epsilon": (one + two) / 2, "delta": 1e-5})
    devices, _ = train_round(env, [0.3] * 4)
    reply = devices[0].checkin()
    assert reply.status == 200 and reply.body["rejection"]["reason"] == "dp_budget_exhausted"
    assert devices[1].checkin().body["rejection"]["reason"] == "dp_budget_exhausted"
    rounds = env.client.get("/v1/populations/en/rounds", headers=env.operator_headers).get_json()["rounds"]
    refused = [r for r in rounds if r["reason"] == "dp_budget_exhausted"]
    assert len(refused) == 1 and refused[0]["state"] == "failed"            # one entry, not one per check-in
    assert env.services.privacy.summary("en", env.services.config.population("en"))["rounds"] == 1
    assert env.services.versions.get("en", 1) is not None
    with pytest.raises(Exception):
        env.services.versions.get("en", 2)


def test_a_restart_keeps_the_ledger_exactly(make_server):
    from server.services import build_services

    env = make_server(dp=NOISY)
    devices, _ = train_round(env, [0.3, 0.6, 0.9, 1.2])
    before = env.services.privacy.summary("en", env.services.config.population("en"))
    again = build_services(env.services.config, clock=env.clock)
    after = again.privacy.summary("en", again.config.population("en"))
    assert after == before and after["rounds"] == 1
    assert again.privacy.spent("en", 1) == env.services.privacy.spent("en", 1)
    train_round(env, [0.3] * 4, devices)
    assert again.privacy.summary("en", again.config.population("en"))["rounds"] == 2   # once, not twice
    again.store.close()


@pytest.mark.parametrize("population,message", [
    ({"dp": {"noise_multiplier": 1.0}}, "clipped_count_stddev"),
    ({"dp": {"mechanism": "distributed", "noise_multiplier": 0.1}}, "secure_aggregation"),
    ({"dp": {"noise_multiplier": 0.1}, "update": {"bits": 32, "weighting": "examples"}}, "uniform"),
    ({"dp_budget": {"epsilon": 1.0, "delta": 1e-6}}, "needs a"),
    ({"dp": {"mechanism": "laplace", "noise_multiplier": 0.1}}, "mechanism"),
])
def test_dp_settings_that_cannot_hold_are_refused_with_the_key_named(population, message):
    from server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config({"populations": {"en": {"goal": 4, **population}}})


def test_the_published_app_model_and_server_status_carry_the_versions_epsilon(make_server, tmp_path, capsys):
    import json

    from server.__main__ import cmd_status
    from types import SimpleNamespace

    one = epsilon([Event("central", 1.0, 1.0)], 1e-5).epsilon
    env = make_server(dp=NOISY, dp_budget={"epsilon": one * 1.5, "delta": 1e-5}, eval_every=1, publish_every=1)
    devices, _ = train_round(env, [0.3] * 4)
    for device in devices:                                   # an evaluation round of version 1
        assert device.checkin().body["assignment"]["task"] == "eval"
        assert device.evaluate(3, 9, 40).body["status"] == "accepted"
    assert env.services.publisher.run_pending() == 1
    assert env.exporter.privacy["epsilon"] == pytest.approx(one) and env.exporter.privacy["delta"] == 1e-5
    model = env.client.get("/v1/populations/en/app-model").get_json()
    assert model["version"] == 1 and model["privacy"]["epsilon"] == pytest.approx(one)
    assert devices[1].checkin().body["rejection"]["reason"] == "dp_budget_exhausted"
    cmd_status(SimpleNamespace(population="en", rounds=5), env.services.config)
    out = capsys.readouterr().out
    assert f"spent ε = {one:.4g} at δ = 1e-05" in out and f"of a budget of ε = {one * 1.5:g}" in out
    assert f"ε {one:.4g}" in out and "dp_budget_exhausted" in out
    body = env.client.get("/v1/populations/en/privacy", headers=env.operator_headers).get_json()
    assert body["rounds"] == 1 and body["events"][0]["noise_multiplier"] == 1.0 and json.dumps(body)


def test_a_noise_free_setting_reports_no_finite_epsilon_as_json_null(make_server):
    env = make_server(dp=DP)                                    # z = 0
    train_round(env, [0.3] * 4)
    body = env.client.get("/v1/populations/en/versions", headers=env.operator_headers)
    assert b"Infinity" not in body.data and body.get_json()["versions"][0]["dp"]["epsilon"] is None
