"""Distributed DP with real phones: every masked upload carries its noise, and every version its ε.

Thirty emulated phones (the device runtime, LiteRT, the real server) train
three rounds under secure aggregation with distributed DP. The test side
keeps each phone's plaintext (what `DeviceSecAgg.mask` was given, as the
secure-aggregation fleet test does) and matches it to the masked upload the
recording proxy saw: unmasked, each upload's codes spread as the round's
per-device discrete Gaussian, so no phone sent a noise-free update.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.update.spec import RoundSpec
from emulation.deployment import simulated_clock, start_server
from emulation.models import tiny_corpus, tiny_model
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet
from tests.recording_proxy import RecordingProxy
from tests.test_secagg_fleet import SECURE, plaintexts_by_session, recorded_plaintexts

pytestmark = pytest.mark.slow
DISTRIBUTED = dict(SECURE, dp={"mechanism": "distributed", "noise_multiplier": 0.5, "initial_clip": 0.5})


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-fleet")
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **DISTRIBUTED, server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        with recorded_plaintexts() as masked_from, RecordingProxy(server.url) as proxy:
            run = run_fleet(root / "fleet", server, corpus, phones=30, rounds=3, url=proxy.url, max_wall_s=300)
        yield server, run, proxy.requests, masked_from
    finally:
        server.kill()


def test_no_phone_sends_a_noise_free_update(dp_run):
    server, run, requests, masked_from = dp_run
    plain = plaintexts_by_session(requests, masked_from, run.details)
    specs = {dev["session_id"]: RoundSpec.from_json(d["update"]) for d in run.details for dev in d["devices"]}
    assert len(plain) >= 15
    for sid, ring in plain.items():
        spec = specs[sid]
        m, L = spec.modulus_bits, 2 ** (spec.spec.bits - 1) - 1
        codes = ((ring[:spec.padded].astype(np.int64) - L + (1 << (m - 1))) % (1 << m)) - (1 << (m - 1))
        sigma = spec.device_noise_units
        assert sigma > 2 * L                          # the noise dwarfs any code an update can have
        # the codes' spread: the noise's σ, within sampling error and the update's own ±L
        assert abs(codes.std() - sigma) < 4 * sigma / math.sqrt(2 * codes.size) + L, (sid, codes.std(), sigma)


def test_every_version_carries_epsilon_and_the_ledger_counts_each_round_once(dp_run):
    server, run, _, _ = dp_run
    completed = [d for d in run.details if d["state"] == "completed" and d["task"] == "train"]
    assert len(completed) >= 3
    ledger = server.operator_get("/v1/populations/en/privacy").json()
    assert ledger["rounds"] == len(completed) and ledger["dp"]["mechanism"] == "distributed"
    reports = {e["round_number"]: e["reports"] for e in ledger["events"]}
    assert reports == {d["round"]: d["reported"] for d in completed}
    versions = server.operator_get("/v1/populations/en/versions").json()["versions"]
    eps = {v["version"]: v["dp"]["epsilon"] for v in versions if v["dp"]}
    assert len(eps) == len(completed) and all(b > a for a, b in zip(sorted(eps.values()), sorted(eps.values())[1:]))


FTRL = dict(FLEET_POPULATION, goal=6, dp={"mechanism": "ftrl", "noise_multiplier": 0.5, "initial_clip": 0.5,
                                          "min_separation_rounds": 3, "max_participations": 2,
                                          "horizon_rounds": 12})


def test_dp_ftrl_never_selects_a_device_within_b_rounds_of_its_last(tmp_path):
    """40 phones, rounds of 6 under DP-FTRL (b = 3): from the recorded sessions, no device was selected
    into a DP round while it had taken part in one of the 2 released before it."""
    corpus = tiny_corpus()
    model = tiny_model(tmp_path / "model", corpus)
    server = start_server(tmp_path / "server", model, **FTRL, server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        run = run_fleet(tmp_path / "fleet", server, corpus, phones=40, rounds=5, max_wall_s=300)
        ledger = server.operator_get("/v1/populations/en/privacy").json()
    finally:
        server.kill()
    train = sorted((d for d in run.details if d["task"] == "train" and d["update"]), key=lambda d: d["round"])
    released, index, took_part = 0, {}, {}
    for d in train:                        # a round's DP index: the releases before it
        index[d["round"]] = released
        if d["state"] == "completed":
            for dev in d["devices"]:
                if dev["outcome"] == "accepted":
                    took_part.setdefault(dev["device"], []).append(released)
            released += 1
    assert released >= 5 and ledger["participation"]["released"] == released
    for d in train:
        for dev in d["devices"]:
            earlier = [i for i in took_part.get(dev["device"], []) if i < index[d["round"]]]
            assert not earlier or index[d["round"]] - max(earlier) >= 3, (dev["device"], earlier, d["round"])
    assert all(len(v) <= 2 for v in took_part.values())
    assert any(d.get("result_version") for d in train)
    assert ledger["mechanism"] == "ftrl" and ledger["spent"]["assumption"] == "participation"
