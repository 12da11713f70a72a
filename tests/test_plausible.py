"""Plausible sums (contract.secagg.plausible): an unmasked sum no honest phones could have sent is refused."""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.dp.noise import SecureRandom
from contract.secagg.plausible import (FALSE_REFUSAL, ImplausibleSum, bounds, check_count_sum, check_update_sum,
                                       largest_step)
from contract.tasks.personal import PersonalReport
from contract.model.metrics import Hits
from contract.update.packing import levels
from contract.update.pipeline import UpdatePipeline
from contract.update.spec import UpdateSpec

SIZE = 3000      # padded to 3072 in blocks of 1024
N = 10


def secure(n: int = N, bits: int = 8, weighting: str = "uniform", dp: tuple | None = None, clip: float = 1.0):
    spec = UpdateSpec(bits=bits, rotation=True, secure_aggregation=True, weighting=weighting, clip_norm=clip,
                      block_size=1024)
    return UpdatePipeline(spec.bind(SIZE, "ab" * 32, "en/1", 3, n, dp=dp))


def honest_sum(pipeline: UpdatePipeline, n: int, seed: int, aligned: bool = False) -> np.ndarray:
    """The ring sum of n honest phones' plaintexts (their masks cancel in a real round)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 1, SIZE)
    total = np.zeros(pipeline.vector_size, np.int64)
    for i in range(n):
        delta = 5 * common if aligned else rng.normal(0, 0.3, SIZE)
        total += pipeline.plaintext(delta, int(rng.integers(1, 400)), seed * 1000 + i).astype(np.int64)
    return pipeline.ring.reduce(total)


@pytest.mark.parametrize("bits,weighting,aligned", [(8, "uniform", False), (8, "uniform", True),
                                                    (4, "examples", False), (4, "uniform", True),
                                                    (2, "examples", True)])
def test_honest_sums_pass_even_with_every_phone_at_the_clip_the_same_way(bits, weighting, aligned):
    p = secure(bits=bits, weighting=weighting)
    for seed in range(3):
        total = honest_sum(p, N, seed, aligned)
        check_update_sum(p.round_spec, total, N)
        mean = p.finalize_masked(total, N)
        assert np.linalg.norm(mean) <= 1.0 + 1e-6          # the mean of clipped updates


def test_honest_noised_sums_pass_and_their_noise_stays_inside_the_tail_bounds():
    dp = ("distributed", 0.02, N, 1.0)
    p = secure(dp=dp)
    spec = p.round_spec
    for seed in range(3):
        check_update_sum(spec, honest_sum(p, N, seed), N)
    b = bounds(spec, N)
    sigma = spec.device_noise_units
    assert sigma > 1                                          # noise of several grid steps per device
    rng = SecureRandom(bytes(32))
    for _ in range(20):                                       # the noise of N phones, 20 times over
        noise = sum(rng.discrete_gaussian(spec.padded, sigma) for _ in range(N))
        assert np.abs(noise).max() < b.coordinate - N * levels(8)
        assert np.linalg.norm(noise) < b.noise_norm
    # the allowances are what the tail bounds say for FALSE_REFUSAL = 1e-9, split three ways
    tail = math.log(3 / FALSE_REFUSAL)
    assert b.noise_norm == pytest.approx(sigma * math.sqrt(N * (spec.padded + 2 * math.sqrt(spec.padded * tail)
                                                                  + 2 * tail)))
    assert b.coordinate - N * levels(8) == pytest.approx(sigma * math.sqrt(2 * N * math.log(
        2 * spec.padded * 3 / FALSE_REFUSAL)))


def with_weight(pipeline: UpdatePipeline, total: np.ndarray, weight_sum: int) -> np.ndarray:
    out = total.copy()
    out[pipeline.count] = weight_sum % 2**32
    return out


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_a_weight_sum_forced_to_0_or_1_is_refused_before_anything_is_decoded(weighting):
    p = secure(weighting=weighting)
    total = honest_sum(p, N, 0)
    for forced in (0, 1, N - 1, N * p.round_spec.spec.weight_cap + 1, 2**32 - 1):
        with pytest.raises(ImplausibleSum) as e:
            p.finalize_masked(with_weight(p, total, forced), N)      # not "no update was accepted"
        assert e.value.reason == "weight_sum" and isinstance(e.value, ValueError)
    if weighting == "uniform":
        with pytest.raises(ImplausibleSum, match="weight_sum"):
            check_update_sum(p.round_spec, with_weight(p, total, N + 1), N)   # uniform: exactly N


def test_a_weight_sum_lowered_by_one_device_does_not_pass_with_the_honest_updates():
    """Example weighting: one device sets its masked weight so that Σw = N, which would scale the honest
    mean up ~300x; the honest codes' norm is then more than N updates of weight 1 can have."""
    p = secure(weighting="examples")
    rng = np.random.default_rng(5)
    total = np.zeros(p.vector_size, np.int64)
    for i in range(N - 1):
        total += p.plaintext(5 * rng.normal(0, 1, SIZE), 300, i).astype(np.int64)
    total[p.count] = 0
    honest = p.ring.reduce(total.copy())
    total[:p.count] += levels(8)                       # the attacker's zero codes
    with pytest.raises(ImplausibleSum, match="norm"):
        check_update_sum(p.round_spec, with_weight(p, p.ring.reduce(total), N), N)
    check_update_sum(p.round_spec, with_weight(p, honest, 300 * (N - 1)), N - 1)


def test_a_device_under_secure_aggregation_keeps_its_codes_within_its_weights_bound():
    spec = secure(weighting="examples").round_spec
    assert spec.masked_bound(317) == 1.0
    assert spec.masked_bound(1) == pytest.approx(1 / 317 + 1.25 * math.sqrt(4 / 127) * math.sqrt(1 / 317))
    p = UpdatePipeline(spec)
    for w in (1, 3, 30, 317):
        for seed in range(5):
            encoded = p.encode(np.random.default_rng(seed).normal(0, 1, SIZE), w, seed, masker=lambda r: r)
            assert 0 < encoded.norm <= spec.masked_bound(w)


def test_codes_off_the_grid_or_beyond_the_clip_are_refused():
    p = secure()
    total = honest_sum(p, N, 1)
    m = p.round_spec.modulus_bits
    far = total.copy()
    far[7] = (far[7] + (N * levels(8) + 1)) % 2**m               # one coordinate beyond N phones' reach
    with pytest.raises(ImplausibleSum) as e:
        check_update_sum(p.round_spec, far, N)
    assert e.value.reason == "coordinate"
    spread = total.copy()                                         # every coordinate in range, the norm not:
    spread[:p.count] = (spread[:p.count] + N * levels(8) // 2) % 2**m    # N·L/2 steps on each of 3072
    with pytest.raises(ImplausibleSum) as e:
        check_update_sum(p.round_spec, spread, N)
    assert e.value.reason == "norm"
    with pytest.raises(ImplausibleSum, match="reports"):
        check_update_sum(p.round_spec, total, 0)


def test_one_modified_phone_gets_no_further_than_largest_step():
    """The attacker's own vector takes all the norm the check leaves: the mean it causes is at most
    `largest_step`, and one step further is refused."""
    p = secure()
    spec = p.round_spec
    total = honest_sum(p, N - 1, 2)
    step = spec.grid_step
    direction = np.random.default_rng(0).choice([-1.0, 1.0], p.count) / math.sqrt(p.count)   # flat: within
                                                                                           # every coordinate's range
    for scale, refused in ((0.9, False), (1.02, True)):           # the bound is N·C on the codes' norm
        attack = np.rint(direction * scale * N * spec.spec.clip_norm / step).astype(np.int64)
        ring = total.copy()
        ring[:p.count] = (ring[:p.count] + attack + levels(8)) % 2**spec.modulus_bits
        ring[p.count] += 1
        if refused:
            with pytest.raises(ImplausibleSum, match="norm"):
                p.finalize_masked(ring, N)
        else:
            mean = p.finalize_masked(ring, N)
            assert 0.9 < np.linalg.norm(mean) <= largest_step(spec, N).largest


def test_largest_step_figures():
    s = largest_step(secure().round_spec, N)                          # uniform, secure: the whole clip
    assert (s.largest, s.honest, s.ratio) == pytest.approx((1.0, 1 / math.sqrt(N), math.sqrt(N)))
    plain = UpdateSpec(bits=8, clip_norm=1.0, weighting="uniform").bind(SIZE, "ab" * 32, "en/1", 3)
    assert largest_step(plain, N).ratio == pytest.approx((1 + 3) / math.sqrt(N))   # one more honest phone
    examples = largest_step(secure(weighting="examples").round_spec, N)           # Σw lowered to N
    assert examples.largest == pytest.approx(1 + 1.25 * math.sqrt(4 / 127) * math.sqrt(317))
    assert largest_step(secure().round_spec, N, honest_step=0.5).ratio == pytest.approx(2.0)
    noised = largest_step(secure(dp=("distributed", 0.02, N, 1.0)).round_spec, N)
    assert noised.largest > 1.0 and noised.honest > 1 / math.sqrt(N)            # both carry the noise


def test_a_personalize_sum_with_a_wrapped_count_is_refused():
    one = PersonalReport(Hits(3, 5, 10), Hits(4, 6, 10), False).vector()
    total = one * 3
    np.testing.assert_array_equal(check_count_sum(total, 3), total)
    bad = total.copy()
    bad[4] = (bad[4] - 100) % 2**32                                 # positions pushed below zero, wrapped
    bad[0] = bad[1] = bad[2] = bad[3] = 0
    with pytest.raises(ImplausibleSum) as e:
        check_count_sum(bad, 4)                                     # and one device too many
    assert e.value.reason == "counts"
