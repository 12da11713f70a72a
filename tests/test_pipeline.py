"""The update pipeline's stages, each on its own, and composed (contract.update.pipeline)."""
from __future__ import annotations

import numpy as np
import pytest

from contract.protocol.errors import ErrorCode, ProtocolError
from contract.update.hadamard import BLOCK_SIZES, padded_size, rotate, unrotate
from contract.update.packing import WIDTHS, levels, pack, packed_bytes, unpack
from contract.update.pipeline import (Clipping, Context, Float32Values, IntegerSum, Quantization, UpdatePipeline,
                               Weighting, aggregate)
from contract.update.spec import BITS, RoundSpec, UpdateSpec, rotation_seed

SIZE = 3000   # not a multiple of any block: padding is exercised


def bound(spec: UpdateSpec, size: int = SIZE, round_key: str = "en/1"):
    return spec.bind(size, "ab" * 32, round_key, rotation_seed(0, 1))


def sparse_update(seed: int, size: int = SIZE) -> np.ndarray:
    """Like a language model's update: most weights barely move, a few rows move a lot."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1e-3, size) * (rng.random(size) < 0.4)
    x[rng.integers(0, size, 20)] += rng.normal(0, 0.05, 20)
    return x.astype(np.float32)


# --- each stage on its own ---------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
def test_bit_packing_is_lossless_at_every_width(bits):
    L = levels(bits)
    rng = np.random.default_rng(bits)
    for count in (1, 7, 8, 1001):
        values = rng.integers(-L, L + 1, count)
        values[:2] = [-L, L][:count]                       # both ends of the grid
        packed = pack(values, bits)
        assert packed.dtype == np.uint8 and len(packed) == packed_bytes(count, bits)
        np.testing.assert_array_equal(unpack(packed, bits, count), values)


@pytest.mark.parametrize("bits", WIDTHS)
def test_unpacking_refuses_the_code_beyond_the_grid_and_a_wrong_length(bits):
    packed = pack(np.zeros(16, np.int64), bits)
    bad = packed.copy()
    bad[:2] = 0xFF                                         # the top code, 2^bits - 1
    with pytest.raises(ProtocolError) as e:
        unpack(bad, bits, 16)
    assert e.value.code == ErrorCode.VALUE_OUT_OF_RANGE
    with pytest.raises(ProtocolError) as e:
        unpack(packed[:-1], bits, 16)
    assert e.value.code == ErrorCode.WRONG_LENGTH
    with pytest.raises(ValueError):
        pack(np.array([levels(bits) + 1]), bits)


@pytest.mark.parametrize("block", BLOCK_SIZES[:3])
def test_rotation_is_exactly_invertible_and_keeps_the_norm(block):
    for seed, size in ((1, 1), (2, block), (3, 3 * block + 17)):
        x = np.random.default_rng(seed).normal(0, 1, size).astype(np.float32)
        z = rotate(x, block, seed)
        assert len(z) == padded_size(size, block)
        back = unrotate(z, size, block, seed)
        np.testing.assert_array_equal(back.astype(np.float32), x)          # bit for bit
        assert np.linalg.norm(z) == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-12)
    x = np.zeros(block, np.float32)
    x[0] = 1.0                                                             # one large coordinate ...
    assert np.abs(rotate(x, block, 0)).max() == pytest.approx(1 / np.sqrt(block))   # ... spread evenly
    assert not np.array_equal(rotate(x, block, 0), rotate(x, block, 1))    # the seed matters


def test_weighting_caps_scales_and_undoes_on_the_sum():
    w = Weighting("examples", cap=100)
    ctx = Context(num_examples=250)
    y = w.encode(np.ones(4), ctx)
    assert ctx.weight == 100 and np.allclose(y, 1.0)                       # capped at W, y = (W/W)·x
    ctx = Context(num_examples=25)
    np.testing.assert_allclose(w.decode(w.encode(np.ones(4), ctx), Context(weight_sum=25)), 1.0)
    for claimed in (0, 101, 10**6):
        with pytest.raises(ProtocolError) as e:
            w.accept(None, Context(num_examples=claimed))
        assert e.value.code == ErrorCode.WEIGHT_OUT_OF_RANGE
    uniform = Weighting("uniform", cap=1)
    ctx = Context(num_examples=999)
    uniform.encode(np.ones(2), ctx)
    assert ctx.weight == 1


def test_clipping_scales_down_only_what_exceeds_the_norm_and_the_server_checks_it():
    clip = Clipping(2.0, unit_exponent=-39)
    small, big = np.array([0.6, 0.8]), np.array([30.0, 40.0])
    np.testing.assert_array_equal(clip.encode(small, Context()), small)
    assert np.linalg.norm(clip.encode(big, Context())) == pytest.approx(2.0)
    clip.accept(None, Context(norm=2.0))                    # the decoded norm, as the value stage measured it
    with pytest.raises(ProtocolError) as e:
        clip.accept(None, Context(norm=2.0000001))
    assert e.value.code == ErrorCode.NORM_EXCEEDS_CLIP
    weighted = Clipping(2.0, unit_exponent=-39, weight_cap=100)            # clip, then weight: C·w/W
    weighted.accept(None, Context(norm=0.02, weight=1))
    weighted.accept(None, Context(norm=2.0, weight=100))
    with pytest.raises(ProtocolError, match="0.02") as e:
        weighted.accept(None, Context(norm=0.0201, weight=1))
    assert e.value.code == ErrorCode.NORM_EXCEEDS_CLIP


def test_quantization_round_trips_within_one_step_per_block_and_measures_the_norm():
    q = Quantization(bits=8, block=256, unit_exponent=-40, max_exponent=-6)
    z = np.random.default_rng(0).normal(0, 1e-3, 1024) * np.repeat([1, 10, 0.01, 0], 256)
    codes, e = q.encode(z, Context(seed=3))
    assert codes.dtype == np.int32 and np.abs(codes).max() <= 127
    assert e[3] == -40                                     # an all-zero block: the smallest scale
    ctx = Context()
    back = q.decode(q.accept((codes, e), ctx), Context())
    assert ctx.norm == pytest.approx(np.linalg.norm(back), rel=1e-12)
    step = np.repeat(np.ldexp(1.0, e), 256)
    assert (np.abs(back - z) < step).all()
    assert (np.abs(z).reshape(4, 256).max(1)[:3] > 127 * np.ldexp(1.0, e[:3]) / 2).all()   # tight scales


def test_stochastic_rounding_is_unbiased_over_10000_seeded_draws():
    q = Quantization(bits=2, block=256, unit_exponent=-40, max_exponent=0)   # 3 levels: rounding is all
    z = np.zeros(256)
    z[:8] = [0.9, 0.7, 0.5, 0.3, 0.1, -0.25, -0.6, -0.95]
    draws = np.stack([q.decode(q.accept(q.encode(z, Context(seed=s)), Context()), Context())[:8]
                      for s in range(10_000)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert (np.abs(mean - z[:8]) <= 3 * se).all(), (mean, z[:8], se)
    nearest = np.round(z[:8])                               # what deterministic rounding would give
    assert (np.abs(nearest - z[:8]) > 3 * se).any()        # ... and this check would catch it


def test_float32_values_pass_through_and_refuse_non_finite_or_huge_values():
    f = Float32Values(clip_norm=2.0, unit_exponent=-39)
    x = np.array([0.5, -1e-7, 0.0], np.float32)
    back = f.decode(f.accept(f.encode(x.astype(np.float64), Context()), Context()), Context())
    np.testing.assert_allclose(back, x, atol=2**-40)
    for bad, code in ((np.array([np.nan], np.float32), ErrorCode.NON_FINITE),
                      (np.array([np.inf], np.float32), ErrorCode.NON_FINITE),
                      (np.array([1e30], np.float32), ErrorCode.VALUE_OUT_OF_RANGE)):
        with pytest.raises(ProtocolError) as e:
            f.accept(bad, Context())
        assert e.value.code == code


# --- composed ----------------------------------------------------------------

@pytest.mark.parametrize("bits,rotation", [(32, False), (16, False), (8, False), (8, True), (4, True),
                                           (2, True)])
def test_the_pipeline_round_trips_and_bounds_every_update(bits, rotation):
    spec = UpdateSpec(bits=bits, rotation=rotation, clip_norm=0.1, max_weight=50)
    pipeline = UpdatePipeline(bound(spec))
    assert pipeline.linear
    deltas = [sparse_update(i) for i in range(5)]
    counts = [10, 50, 80, 1, 30]
    encoded = [pipeline.encode(d, n, seed=i) for i, (d, n) in enumerate(zip(deltas, counts))]
    assert [e.weight for e in encoded] == [10, 50, 50, 1, 30]               # capped at max_weight
    assert all(e.norm <= 0.1 * e.weight / 50 for e in encoded)              # clipped, then weighted
    mean = aggregate(pipeline, [(e.body, e.weight) for e in encoded])
    w = np.array([e.weight for e in encoded], np.float64)
    clipped = [d * min(1.0, 0.1 / np.linalg.norm(d.astype(np.float64))) for d in deltas]
    exact = sum(wi * c for wi, c in zip(w, clipped)) / w.sum()
    error = np.linalg.norm(mean - exact) / np.linalg.norm(exact)
    # relative error of the mean; without rotation a block's few large values set its scale
    assert error < {(32, False): 1e-6, (16, False): 1e-3, (8, False): 0.1, (8, True): 0.05,
                    (4, True): 0.6, (2, True): 2.0}[bits, rotation], error
    body_bytes = len(encoded[0].body)
    assert body_bytes < {32: 4.1, 16: 2.1, 8: 1.1, 4: 0.6, 2: 0.35}[bits] * SIZE + 300


def test_the_sum_is_exact_in_any_order_and_grouping():
    pipeline = UpdatePipeline(bound(UpdateSpec(bits=8, rotation=True)))
    contributions = [pipeline.accept(pipeline.encode(sparse_update(i), 20 + i, i).body, 20 + i)
                     for i in range(6)]
    forward = IntegerSum(pipeline.count)
    for c in contributions:
        forward.add(c)
    halves = [IntegerSum(pipeline.count), IntegerSum(pipeline.count)]
    for i, c in enumerate(reversed(contributions)):
        halves[i % 2].add(c)
    merged = halves[0].merge(halves[1])
    np.testing.assert_array_equal(forward.total, merged.total)
    assert (forward.weight, forward.updates) == (merged.weight, merged.updates) == (sum(range(20, 26)), 6)
    np.testing.assert_array_equal(pipeline.finalize(forward.total, forward.weight),
                                  pipeline.finalize(merged.total, merged.weight))


def test_a_device_update_that_rounding_pushes_over_the_clip_is_shrunk_not_refused():
    spec = UpdateSpec(bits=2, rotation=True, clip_norm=1.0, max_weight=10)   # 2 bits: rounding adds norm
    pipeline = UpdatePipeline(bound(spec))
    delta = np.random.default_rng(0).normal(0, 1, SIZE).astype(np.float32)
    encoded = pipeline.encode(delta, 10, seed=0)
    assert 0.5 < encoded.norm <= 1.0
    assert pipeline.accept(encoded.body, encoded.weight).norm == encoded.norm


def test_an_update_names_its_round_and_settings():
    one, other = bound(UpdateSpec()), bound(UpdateSpec(), round_key="en/2")
    assert one.fingerprint != other.fingerprint != bound(UpdateSpec(bits=4)).fingerprint
    body = UpdatePipeline(one).encode(sparse_update(0), 10, 0).body
    with pytest.raises(ProtocolError) as e:
        UpdatePipeline(other).accept(body, 10)
    assert e.value.code == ErrorCode.WRONG_SPEC


def test_spec_settings_are_validated():
    assert UpdateSpec().validate() == UpdateSpec()
    for bad in (dict(bits=12), dict(bits=32, rotation=True), dict(clip_norm=0.0),
                dict(clip_norm=float("inf")), dict(weighting="size"), dict(max_weight=0),
                dict(block_size=1000)):
        with pytest.raises(ValueError):
            UpdateSpec(**bad).validate()
    assert set(BITS) == {32, 16, 8, 4, 2}


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_an_update_above_what_its_claimed_weight_allows_is_refused(bits):
    """One example claimed, a full-norm update sent: it would count W times what its weight allows."""
    pipeline = UpdatePipeline(bound(UpdateSpec(bits=bits, rotation=bits < 32, clip_norm=1.0, max_weight=100)))
    full = pipeline.encode(np.random.default_rng(0).normal(0, 1, SIZE), 100, seed=1)
    assert full.weight == 100 and full.norm > 0.99
    assert pipeline.accept(full.body, 100).weight == 100
    for claimed in (1, 50, 99):
        with pytest.raises(ProtocolError) as e:
            pipeline.accept(full.body, claimed)
        assert e.value.code == ErrorCode.NORM_EXCEEDS_CLIP
    small = pipeline.encode(np.random.default_rng(0).normal(0, 1, SIZE), 1, seed=1)
    assert small.norm <= 0.01 and pipeline.accept(small.body, 1).norm == small.norm


@pytest.mark.parametrize("bits,rotation", [(8, False), (8, True), (4, False), (4, True)])
def test_a_clipped_update_meets_the_bound_after_quantization_in_every_seed(bits, rotation):
    """Clipping to exactly C and quantizing once decodes above C in most seeds (rounding adds to the
    norm): the spec tells the phone the bound is on the decoded update, and the phone's encoder
    shrinks until it is. 200 seeds: every update accepted, none sent as zeros, little norm lost."""
    spec = UpdateSpec(bits=bits, rotation=rotation, clip_norm=1.0, weighting="uniform")
    pipeline = UpdatePipeline(bound(spec))
    once_refused, norms = 0, []
    for seed in range(200):
        delta = np.random.default_rng(seed).normal(0, 1, SIZE)
        ctx = Context(num_examples=1, seed=seed)
        body = delta / np.linalg.norm(delta)                    # clipped to exactly C, encoded once
        for stage in pipeline.stages:
            body = stage.encode(body, ctx)
        try:
            pipeline.accept(body, 1)
        except ProtocolError as e:
            assert e.code == ErrorCode.NORM_EXCEEDS_CLIP
            once_refused += 1
        encoded = pipeline.encode(3 * delta, 1, seed)
        norms.append(pipeline.accept(encoded.body, 1).norm)
    assert once_refused > (100 if bits == 8 else 199)
    assert min(norms) > (0.999 if bits == 8 else 0.95) and max(norms) <= 1.0
    assert np.median(norms) > (0.9998 if bits == 8 else 0.995)


def test_uniform_weighting_says_max_weight_1_and_takes_num_examples_1():
    spec = bound(UpdateSpec(weighting="uniform", max_weight=317))
    assert spec.spec.max_weight == spec.spec.weight_cap == 1 == spec.to_json()["max_weight"]
    assert RoundSpec.from_json(spec.to_json()) == spec
    pipeline = UpdatePipeline(spec)
    encoded = pipeline.encode(sparse_update(0), 250, seed=0)
    assert encoded.weight == 1 and pipeline.accept(encoded.body, 1).weight == 1
    with pytest.raises(ProtocolError, match=r"max_weight = 1\]") as e:
        pipeline.accept(encoded.body, 5)
    assert e.value.code == ErrorCode.WEIGHT_OUT_OF_RANGE
    assert bound(UpdateSpec(max_weight=317)).spec.max_weight == 317          # examples: as configured


def test_secure_aggregation_needs_the_weight_sum_to_fit_its_word():
    spec = UpdateSpec(bits=8, rotation=True, secure_aggregation=True, max_weight=2**20)
    spec.bind(SIZE, "ab" * 32, "en/1", 0, cohort_max=2**11)
    with pytest.raises(ValueError, match="cohort_max × max_weight"):
        spec.bind(SIZE, "ab" * 32, "en/1", 0, cohort_max=2**12)
