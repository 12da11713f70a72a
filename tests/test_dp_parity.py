"""DP-FedAvg's clipping and adaptive clip, server (contract) against TFF's own aggregator.

With z = 0 the server's round (the update pipeline with DP bound into the
round's spec, then contract.dp.noise.adapt_clip) and TFF's
`DifferentiallyPrivateFactory.gaussian_adaptive` see the same client updates
for 20 rounds: the means and the clip estimates agree within 1e-6. The TFF
noise split is TFF's function itself.
"""
from __future__ import annotations

import numpy as np
import pytest

from contract.dp.noise import DPSpec, adapt_clip, noise_split
from contract.update.pipeline import UpdatePipeline, running_sum
from contract.update.spec import UpdateSpec

SIZE, CLIENTS, ROUNDS = 64, 8, 20


def server_rounds(rounds: list[list[np.ndarray]], spec: DPSpec):
    clip, means, clips = spec.initial_clip, [], []        # clips: after each round (as TFF reports it)
    for r, deltas in enumerate(rounds):
        pipeline = UpdatePipeline(UpdateSpec(bits=32, clip_norm=clip, weighting="uniform").bind(
            SIZE, "0" * 64, f"en/{r}", r, 0, ("central", 0.0, CLIENTS)))
        total = running_sum(pipeline)
        for i, d in enumerate(deltas):
            total.add(pipeline.accept(pipeline.encode(d, 1, seed=i).body, 1))
        mean, unclipped = pipeline.finalize_with_count(total.total, total.weight)
        means.append(mean)
        clip = adapt_clip(clip, unclipped, len(deltas), CLIENTS, spec)
        clips.append(clip)
    return means, clips


def tff_rounds(rounds: list[list[np.ndarray]], spec: DPSpec):
    from models.tff_runtime import tff_session

    with tff_session() as tff:
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=0.0, clients_per_round=CLIENTS, initial_l2_norm_clip=spec.initial_clip,
            target_unclipped_quantile=spec.target_quantile, learning_rate=spec.clip_learning_rate)
        process = factory.create(tff.TensorType(np.float32, [SIZE]))
        state = process.initialize()
        means, clips = [], []
        for deltas in rounds:
            out = process.next(state, [d.astype(np.float32) for d in deltas])
            clips.append(float(out.measurements["dp_query_metrics"]["clip"]))
            means.append(np.asarray(out.result))
            state = out.state
    return means, clips


def test_twenty_rounds_of_clipping_and_adaptive_clip_equal_tffs_gaussian_adaptive():
    g = np.random.default_rng(5)                                   # test data, not noise
    rounds = [[g.normal(size=SIZE) * g.uniform(0.01, 0.3) for _ in range(CLIENTS)] for _ in range(ROUNDS)]
    spec = DPSpec(noise_multiplier=0.0, initial_clip=0.1)
    ours, our_clips = server_rounds(rounds, spec)
    theirs, their_clips = tff_rounds(rounds, spec)
    np.testing.assert_allclose(our_clips, their_clips, rtol=0, atol=1e-6)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert their_clips[-1] > 3 * spec.initial_clip                   # the clip did move: the test can fail


@pytest.mark.parametrize("z,expected", [(0.5, 100.0), (1.0, 20.0), (3.0, 1000.0)])
def test_the_noise_split_is_tffs(z, expected):
    from tensorflow_federated.python.aggregators.differential_privacy import adaptive_clip_noise_params

    assert noise_split(z, expected) == pytest.approx(adaptive_clip_noise_params(z, expected), rel=1e-12)
