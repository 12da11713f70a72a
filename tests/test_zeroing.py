"""Zeroing: an update far above the last round's median norm is counted but adds nothing."""
from __future__ import annotations

import numpy as np
import pytest

from contract.update.pipeline import UpdatePipeline
from contract.update.robust import zeroing_norm
from contract.update.spec import RoundSpec, UpdateSpec


def test_the_threshold_is_a_multiple_of_the_median_and_absent_before_any_round():
    assert zeroing_norm(3.0, [0.1, 0.2, 0.4, 10.0]) == pytest.approx(0.9)   # one outlier does not move it
    assert zeroing_norm(3.0, []) == 0.0
    assert zeroing_norm(0.0, [0.1, 0.2]) == 0.0
    assert zeroing_norm(2.0, [None, float("nan"), 0.5]) == 1.0


def test_the_pipeline_flags_an_update_above_the_rounds_zeroing_norm_and_only_that():
    spec = UpdateSpec(bits=8, clip_norm=1.0, weighting="uniform", zeroing=3.0)
    bound = spec.bind(300, "0" * 64, "en/2", 7, zeroing_norm=0.3)
    pipeline = UpdatePipeline(bound)
    g = np.random.default_rng(0)
    small, large = g.normal(size=300), g.normal(size=300)
    small *= 0.2 / np.linalg.norm(small)
    large *= 0.9 / np.linalg.norm(large)
    flags = [pipeline.accept(e.body, e.weight).zeroed for e in (pipeline.encode(small, 1, 1),
                                                                 pipeline.encode(large, 1, 2))]
    assert flags == [False, True]
    # the threshold travels in the spec, and a spec without zeroing keeps its old fingerprint
    assert RoundSpec.from_json(bound.to_json()).zeroing_norm == 0.3
    plain = UpdateSpec(bits=8, clip_norm=1.0).bind(300, "0" * 64, "en/2", 7)
    assert "zeroing" not in plain.to_json() and "zeroing_norm" not in plain.to_json()


def test_a_replaced_model_at_the_clip_is_zeroed_and_moves_the_version_by_nothing(make_server):
    """Every defence of a plain round (clip, uniform weight, zeroing): one model-replacement attacker
    in a round moves the version less than one honest device does (by nothing at all)."""
    from tests.server_fixtures import DeviceClient, FlaskTransport

    env = make_server(goal=5, update={"bits": 32, "clip_norm": 1.0, "weighting": "uniform", "zeroing": 3.0})
    transport = FlaskTransport(env.client)
    g = np.random.default_rng(3)

    def honest() -> np.ndarray:
        d = g.normal(size=env.layout.size)
        return d * (g.uniform(0.05, 0.15) / np.linalg.norm(d))

    for _ in range(5):                                  # round 1: no threshold yet
        device = DeviceClient(transport, "en", env.enrollment)
        assert "assignment" in device.checkin().body
        assert device.upload(honest(), 1).body["status"] == "accepted"
    v1 = env.services.versions.weights(env.services.versions.get("en", 1))
    honest_deltas = [honest() for _ in range(4)]
    attacker = np.full(env.layout.size, 1.0)            # the attacker's goal, boosted, then clipped to C
    for delta in [*honest_deltas, attacker]:
        device = DeviceClient(transport, "en", env.enrollment)
        assignment = device.checkin().body["assignment"]
        assert 3 * 0.05 <= assignment["update"]["zeroing_norm"] <= 3 * 0.15   # 3 × round 1's median norm
        assert device.upload(delta, 1).body["status"] == "accepted"   # the attacker learns nothing
    moved = env.services.versions.weights(env.services.versions.get("en", 2)) - v1
    np.testing.assert_allclose(moved, np.mean(honest_deltas, axis=0), atol=1e-6)
    honest_influence = np.linalg.norm(np.mean([*honest_deltas, honest_deltas[0]], axis=0)
                                      - np.mean(honest_deltas, axis=0))
    assert np.linalg.norm(moved - np.mean(honest_deltas, axis=0)) < 1e-6 < honest_influence
    detail = env.client.get("/v1/populations/en/rounds/2", headers=env.operator_headers).get_json()
    assert detail["zeroed"] == 1 and detail["reported"] == 5
    assert [d["reason"] for d in detail["devices"]].count("zeroed") == 1


@pytest.mark.parametrize("population,message", [
    ({"secure_aggregation": True, "update": {"bits": 8, "zeroing": 3.0}}, "zeroing reads every update's norm"),
    ({"update": {"bits": 8, "weighting": "uniform", "zeroing": 3.0}, "dp": {"noise_multiplier": 0.1}},
     "zeroing draws its threshold"),
    ({"update": {"bits": 8, "zeroing": -1.0}}, "zeroing must be a finite number >= 0"),
])
def test_zeroing_is_refused_where_the_server_cannot_see_norms_or_dp_would_not_cover_it(population, message):
    from server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config({"populations": {"en": {"goal": 5, **population}}})
