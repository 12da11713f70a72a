"""contract.dp.noise and privacy.accounting: the clip, the noise and the ε, against their definitions."""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from contract.dp.noise import DPSpec, SecureRandom, adapt_clip, next_clip, noise_split
from contract.update.pipeline import UpdatePipeline, running_sum
from contract.update.spec import UpdateSpec
from privacy.accounting import Event, epsilon, would_exceed

KEY = bytes(range(32))


def test_secure_random_is_keyed_by_the_os_and_reproducible_only_with_an_explicit_key():
    assert not np.array_equal(SecureRandom().uniform(8), SecureRandom().uniform(8))
    np.testing.assert_array_equal(SecureRandom(KEY).uniform(8), SecureRandom(KEY).uniform(8))
    u = SecureRandom(KEY).uniform(200_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 3 * math.sqrt(1 / 12 / u.size)


@pytest.mark.parametrize("stddev", [0.5, 3.0])
def test_normal_noise_has_the_planned_stddev_within_three_standard_errors(stddev):
    z = SecureRandom(KEY).normal(400_001, stddev)
    n = z.size
    assert abs(z.mean()) < 3 * stddev / math.sqrt(n)
    assert abs(z.std() - stddev) < 3 * stddev / math.sqrt(2 * n)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 7.5])
def test_discrete_gaussian_matches_its_pmf(sigma):
    draws = SecureRandom(KEY).discrete_gaussian(200_000, sigma)
    assert draws.dtype == np.int64
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2))
    pmf /= pmf.sum()
    variance = float(np.sum(pmf * support ** 2))
    assert abs(draws.mean()) < 3 * math.sqrt(variance / draws.size)
    assert abs(draws.var() - variance) < 3 * variance * math.sqrt(2 / draws.size) * 1.5
    counts = np.array([(draws == k).sum() for k in support])
    expected = pmf * draws.size
    big = expected > 50                                    # a chi-square over the well-populated cells
    chi2 = float(np.sum((counts[big] - expected[big]) ** 2 / expected[big]))
    assert chi2 < big.sum() + 5 * math.sqrt(2 * big.sum())


def test_the_noise_split_leaves_the_total_noise_multiplier():
    zv, sb = noise_split(1.0, 100)
    assert sb == 5.0 and math.isclose(zv ** -2 + (2 * sb) ** -2, 1.0)
    assert noise_split(0.0, 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        noise_split(1.0, 10)                        # 2σ_b = 1: nothing left for the values


def test_the_adaptive_clip_converges_to_the_median_where_flowers_rule_collapses():
    """Norms around 1, starting from 0.1: the rule of Andrew et al. (the unclipped fraction) reaches
    ~1; Flower's server-side variant, fed the clipped fraction instead, falls towards 0."""
    norms = SecureRandom(KEY).uniform(100 * 50).reshape(100, 50) * 0.4 + 0.8      # in [0.8, 1.2]
    spec = DPSpec(noise_multiplier=0.0)
    ours = flowers = 0.1
    for row in norms:
        ours = next_clip(ours, float(np.sum(row <= ours)) - 25, 50, spec)
        flowers = next_clip(flowers, float(np.sum(row > flowers)) - 25, 50, spec)
    assert 0.95 < ours < 1.05
    assert flowers < 0.01


def test_adapt_clip_noises_the_count_with_the_split_stddev():
    spec = DPSpec(noise_multiplier=1.0)
    clip = 1.0
    rng = SecureRandom(KEY)
    outcomes = [math.log(adapt_clip(clip, 50, 100, 100, spec, rng)) for _ in range(4000)]
    # log C' = -η (clamp(0.5 + noise / 100) - 0.5): the noise's stddev 5 shows as 0.2 · 5 / 100
    assert abs(np.std(outcomes) - 0.2 * 5 / 100) < 3 * 0.01 / math.sqrt(2 * 4000)


def dp_pipeline(mechanism="central", stddev=0.0, denominator=8, clip=1.0, secure=False, bits=32):
    spec = UpdateSpec(bits=bits, clip_norm=clip, weighting="uniform", secure_aggregation=secure,
                      rotation=secure or bits < 32)
    return UpdatePipeline(spec.bind(300, "0" * 64, "en/1", 7, 16 if secure else 0,
                                    (mechanism, stddev, denominator)))


def updates(n=6, size=300, seed=1):
    g = np.random.default_rng(seed)                  # test data, not noise
    return [g.normal(size=size) * s for s in np.linspace(0.002, 0.12, n)]


def test_a_dp_round_is_the_clipped_sum_over_the_fixed_denominator_and_counts_the_unclipped():
    pipeline = dp_pipeline()
    deltas = updates()
    total = running_sum(pipeline)
    for i, d in enumerate(deltas):
        total.add(pipeline.accept(pipeline.encode(d, 40, seed=i).body, 1))
    mean, unclipped = pipeline.finalize_with_count(total.total, total.weight)
    clipped = [d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas]
    np.testing.assert_allclose(mean, np.sum(clipped, axis=0) / 8, atol=1e-6)    # over 8 expected, not 6
    assert unclipped == sum(np.linalg.norm(d) <= 1.0 for d in deltas) and 0 < unclipped < 6


def test_under_secure_aggregation_the_unclipped_bit_is_masked_and_summed():
    from contract.secagg.masking import DeviceSecAgg  # noqa: F401  (the masks are exercised in test_secagg_*)

    pipeline = dp_pipeline(secure=True, bits=8)
    assert pipeline.vector_size == pipeline.count + 2
    deltas = updates()
    rings = [pipeline.plaintext(d, 40, seed=i) for i, d in enumerate(deltas)]
    assert all(r.shape == (pipeline.count + 2,) for r in rings)
    ring_sum = pipeline.ring.reduce(np.sum([r.astype(np.int64) for r in rings], axis=0))
    mean, unclipped = pipeline.finalize_masked_with_count(ring_sum, len(rings))
    assert unclipped == sum(np.linalg.norm(d) <= 1.0 for d in deltas)
    clipped = [d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas]
    np.testing.assert_allclose(mean, np.sum(clipped, axis=0) / 8, atol=0.02)


def test_central_noise_on_the_sum_has_stddev_z_c():
    pipeline = dp_pipeline(stddev=0.3, denominator=1)
    body = pipeline.encode(np.zeros(300), 1, seed=0).body
    total = running_sum(pipeline).add(pipeline.accept(body, 1))
    rng = SecureRandom(KEY)
    noise = np.concatenate([pipeline.finalize(total.total.copy(), 1, rng) for _ in range(400)])
    assert abs(noise.std() - 0.3) < 3 * 0.3 / math.sqrt(2 * noise.size)
    assert not np.array_equal(pipeline.finalize(total.total.copy(), 1), pipeline.finalize(total.total.copy(), 1))


def test_dp_settings_are_refused_where_they_cannot_hold():
    spec = UpdateSpec(bits=32, weighting="examples")
    with pytest.raises(ValueError, match="uniform"):
        spec.bind(10, "0" * 64, "en/1", 1, 0, ("central", 0.1, 8))
    with pytest.raises(ValueError, match="secure aggregation"):
        UpdateSpec(bits=32, weighting="uniform").bind(10, "0" * 64, "en/1", 1, 0, ("distributed", 0.1, 8))
    plain = UpdateSpec(bits=32, weighting="uniform").bind(10, "0" * 64, "en/1", 1)
    assert "dp_mechanism" not in plain.to_json()           # non-DP rounds keep their fingerprints


def test_the_ledger_equals_dp_accounting_on_the_same_events():
    q = 1.01 ** -300                                      # on the rounding grid: the events are exact
    events = [Event("central", 1.0, q)] * 300 + [Event("distributed", 1.01 ** 10, q)] * 50
    spent = epsilon(events, 1e-6)
    direct = {}
    for name, accountant in (("pld", dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)),
                             ("rdp", dp_accounting.rdp.RdpAccountant())):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), 300)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.01 ** 10)), 50)
        direct[name] = accountant.get_epsilon(1e-6)
    assert spent.accountant == min(direct, key=direct.get) == "pld"
    assert math.isclose(spent.epsilon, direct["pld"], rel_tol=1e-9)
    assert spent.by_accountant["rdp"] == pytest.approx(direct["rdp"], rel=1e-3)   # orders differ a little
    assert spent.rounds == 350


def test_rounding_never_spends_less_and_the_budget_check_looks_one_round_ahead():
    exact = epsilon([Event("central", 1.2345, 0.0123)] * 40, 1e-5)
    rounded = Event("central", 1.2345, 0.0123).rounded()
    assert rounded.noise_multiplier <= 1.2345 and rounded.sampling_probability >= 0.0123
    assert epsilon([rounded] * 40, 1e-5).epsilon == pytest.approx(exact.epsilon, rel=1e-9)
    events = [Event("central", 1.0, 0.01)] * 20
    now = epsilon(events, 1e-5).epsilon
    refuse, then = would_exceed(events, Event("central", 1.0, 0.01), now + 1e-9, 1e-5)
    assert refuse and then.epsilon > now
    assert not would_exceed(events, Event("central", 1.0, 0.01), then.epsilon + 1e-9, 1e-5)[0]
    assert epsilon([Event("central", 0.0, 0.01)], 1e-5).epsilon == math.inf     # no noise, no guarantee


def distributed(n_devices=16, denominator=16, z_stddev=0.05):
    spec = UpdateSpec(bits=8, clip_norm=1.0, weighting="uniform", secure_aggregation=True, rotation=True)
    return UpdatePipeline(spec.bind(3000, "0" * 64, "en/1", 7, n_devices, ("distributed", z_stddev, denominator, 1.0)))


def test_every_device_masks_a_noised_update_and_the_unmasked_sum_carries_the_planned_noise():
    pipeline = distributed()
    spec = pipeline.round_spec
    sigma = spec.device_noise_units
    assert sigma > 3 and spec.modulus_bits > UpdatePipeline(UpdateSpec(
        bits=8, clip_norm=1.0, weighting="uniform", secure_aggregation=True, rotation=True).bind(
            3000, "0" * 64, "en/1", 7, 16)).round_spec.modulus_bits        # room for the noise
    zero = np.zeros(3000)
    one = pipeline.plaintext(zero, 1, seed=0).astype(np.int64)
    codes = ((one[:pipeline.count] + (1 << (spec.modulus_bits - 1)) - 127) % (1 << spec.modulus_bits)
             - (1 << (spec.modulus_bits - 1)))
    assert abs(codes.std() - sigma) < 3 * sigma / math.sqrt(2 * codes.size)   # no noise-free update leaves
    assert not np.array_equal(one, pipeline.plaintext(zero, 1, seed=0))       # fresh noise, same seed
    for n in (16, 9):                                                          # all report; 7 drop out
        sums = []
        for _ in range(12):
            rings = [pipeline.plaintext(zero, 1, seed=i).astype(np.int64) for i in range(n)]
            total = pipeline.ring.reduce(np.sum(rings, axis=0))
            mean, unclipped = pipeline.finalize_masked_with_count(total, n)
            sums.append(mean * 16)                                             # the noised sum
            assert abs(unclipped - n) < 8 * spec.dp_count_stddev * math.sqrt(n / 16) + 1e-9
        noise = np.concatenate(sums)
        want = 0.05 * math.sqrt(n / 16)                                        # dp_stddev, scaled by who came
        assert abs(noise.std() - want) < 3 * want / math.sqrt(2 * noise.size)


def test_the_ledger_counts_the_noise_the_reporting_devices_actually_added():
    from privacy.accounting import discrete_gaussian_sum_epsilon, distributed_noise_multiplier

    pipeline = distributed(z_stddev=0.5)
    spec = pipeline.round_spec
    full = distributed_noise_multiplier(spec, 16)
    zv = 0.5 / spec.spec.clip_norm          # σ on the sum / C: what the values alone get
    assert full == pytest.approx(1 / math.sqrt(zv ** -2 + 0.5 ** 2), rel=1e-6)   # count: 2σ_b = 2
    assert distributed_noise_multiplier(spec, 9) == pytest.approx(full * math.sqrt(9 / 16), rel=1e-6)
    assert epsilon([Event("distributed", distributed_noise_multiplier(spec, 9), 0.01)] * 10, 1e-6).epsilon > \
        epsilon([Event("distributed", full, 0.01)] * 10, 1e-6).epsilon
    # a small σ is far from one discrete Gaussian: the τ term shows
    assert discrete_gaussian_sum_epsilon(1.0, 0.3, 50, 1000) > 1 / (0.3 * math.sqrt(50)) * 1.5
