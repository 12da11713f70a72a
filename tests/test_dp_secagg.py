"""Distributed DP under secure aggregation on the real server: the devices add the noise, the server
sees only the noised sum, and the ledger records the noise of the devices that were summed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.update.stages import Context
from privacy.accounting import distributed_noise_multiplier
from tests.test_secagg_server import N, check_in, play, round_info, secure_server, spy_unmask, version_weights

DISTRIBUTED = {"mechanism": "distributed", "noise_multiplier": 0.5, "initial_clip": 1.0,
               "clipped_count_stddev": 1.0}


def dp_server(make_server):
    return secure_server(make_server, dp=DISTRIBUTED, update={"bits": 8, "clip_norm": 2.5})


@pytest.mark.parametrize("drop", [{}, {"masking": {3, 4, 5}}], ids=["all", "three-drop"])
def test_a_distributed_dp_round_is_recorded_with_the_noise_of_those_summed(make_server, drop):
    env = dp_server(make_server)
    seen = spy_unmask(env)
    phones = check_in(env)
    spec = phones[0].pipeline().round_spec
    assert (spec.dp_mechanism, spec.dp_denominator, spec.spec.clip_norm) == ("distributed", N, 1.0)
    uploaded = play(env, phones, drop)
    info = round_info(env)
    assert (info["state"], info["result_version"]) == ("completed", 1), info
    ledger = env.services.privacy.summary("en", env.services.config.population("en"))
    event = ledger["events"][0]
    assert event["reports"] == len(uploaded) == N - len(drop.get("masking", ()))
    assert event["noise_multiplier"] == pytest.approx(distributed_noise_multiplier(spec, len(uploaded)))
    assert event["noise_multiplier"] == pytest.approx(0.5 * math.sqrt(len(uploaded) / N), rel=0.01)
    # the unmasked sum is noised: its codes spread like n devices' noise, far beyond the updates' own
    pipeline = phones[0].pipeline()
    plain, survivors = seen[0]
    codes = pipeline.ring.decode(pipeline.ring.reduce(plain.astype(np.int64)), Context(survivors=survivors))
    sigma = spec.device_noise_units * math.sqrt(survivors)
    assert abs(codes.std() - sigma) < 0.05 * sigma
    step = version_weights(env, 1) - env.flat
    assert np.isfinite(step).all() and np.linalg.norm(step) > 0
