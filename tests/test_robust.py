"""contract.update.robust: the trimmed mean and the median against their definitions, and what an outlier does."""
from __future__ import annotations

import numpy as np
import pytest

from contract.update.robust import aggregate, median, memory_bytes, trimmed, trimmed_mean


def test_the_trimmed_mean_drops_k_values_at_each_end_of_every_coordinate():
    g = np.random.default_rng(0)                       # test data
    x = g.normal(size=(10, 7)).astype(np.float32)
    got = trimmed_mean(x, 0.2)                         # k = 2
    want = np.sort(x, axis=0)[2:8].mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert trimmed(10, 0.2) == 2 and trimmed(3, 0.49) == 1 and trimmed(2, 0.4) == 0
    np.testing.assert_allclose(trimmed_mean(x, 0.0), x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(median(x), np.median(x, axis=0), rtol=1e-6)


def test_one_huge_update_moves_the_mean_but_not_the_robust_aggregates():
    honest = np.full((9, 5), 0.1, np.float32)
    attacked = np.vstack([honest, np.full((1, 5), 1e6, np.float32)])
    assert aggregate("mean", attacked)[0] > 1e4
    np.testing.assert_allclose(aggregate("trimmed_mean", attacked, 0.1), 0.1, rtol=1e-6)
    np.testing.assert_allclose(aggregate("median", attacked), 0.1, rtol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(np.zeros((4, 2)), 0.5)
    with pytest.raises(ValueError, match="aggregator"):
        aggregate("krum", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no updates"):
        median(np.zeros((0, 3)))
    assert memory_bytes(10, 1_413_000) == 56_520_000


def test_a_robust_round_on_the_server_is_the_trimmed_mean_of_the_clipped_updates(make_server):
    from tests.server_fixtures import DeviceClient, FlaskTransport

    env = make_server(goal=5, update={"bits": 32, "clip_norm": 1.0, "weighting": "uniform",
                                      "aggregator": "trimmed_mean", "trim": 0.2})
    transport = FlaskTransport(env.client)
    g = np.random.default_rng(1)
    deltas = [g.normal(0, 0.01, env.layout.size) for _ in range(4)] + [np.full(env.layout.size, 5.0)]
    for delta in deltas:
        device = DeviceClient(transport, "en", env.enrollment)
        assert "assignment" in device.checkin().body
        assert device.upload(delta, 1).body["status"] == "accepted"
    clipped = np.stack([d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas])
    want = trimmed_mean(clipped, 0.2)                              # the attacker's coordinates are dropped
    got = env.services.versions.weights(env.services.versions.get("en", 1)) - env.flat
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(got.mean()) < 0.003 < clipped.mean(axis=0).mean()   # the plain mean follows the attacker


@pytest.mark.parametrize("population,message", [
    ({"secure_aggregation": True, "update": {"bits": 8, "weighting": "uniform", "aggregator": "median"}},
     "secure aggregation shows the server only their sum"),
    ({"update": {"bits": 8, "aggregator": "median"}}, "weighting = 'uniform'"),
    ({"update": {"bits": 8, "weighting": "uniform", "aggregator": "krum"}}, "aggregator must be one of"),
])
def test_a_robust_aggregator_is_refused_where_it_cannot_work(population, message):
    from server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config({"populations": {"en": {"goal": 5, **population}}})


def test_the_pipeline_itself_refuses_a_non_linear_stage_under_secure_aggregation():
    import dataclasses

    from contract.update.pipeline import UpdatePipeline
    from contract.update.spec import UpdateSpec

    spec = UpdateSpec(bits=8, weighting="uniform", aggregator="median")
    assert not UpdatePipeline(spec.bind(100, "0" * 64, "en/1", 1)).linear
    bound = spec.bind(100, "0" * 64, "en/1", 1)
    forced = dataclasses.replace(bound, spec=dataclasses.replace(spec, secure_aggregation=True, rotation=True),
                                 cohort_max=5)
    with pytest.raises(ValueError, match="linear"):
        UpdatePipeline(forced)
