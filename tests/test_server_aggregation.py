"""Update decoding/validation, the weighted average, and the durable sharded running sum."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from safetensors.numpy import save

from server.aggregation import WeightedSum, decode_update, encode_update, weighted_mean
from server.errors import InvalidUpdate
from server.partials import PartialSums


def test_weighted_sum_equals_numpy_weighted_average_in_any_grouping():
    rng = np.random.default_rng(0)
    deltas = rng.normal(0, 1, (40, 333)).astype(np.float32)
    weights = rng.integers(1, 500, 40).astype(np.float64)
    expected = np.average(deltas.astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(weighted_mean(zip(deltas, weights), 333), expected, rtol=1e-5, atol=1e-6)
    shards = [WeightedSum(333) for _ in range(3)]   # as the server's shards fold them
    for i, (d, w) in enumerate(zip(deltas, weights)):
        shards[i % 3].add(d, w)
    total = WeightedSum(333)
    for s in shards:
        total.merge(s)
    assert total.count == 40 and total.weight == weights.sum()
    np.testing.assert_allclose(total.mean(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        WeightedSum(3).add(np.zeros(3, np.float32), 0)


def test_decode_round_trips_and_names_each_problem():
    delta = np.linspace(-1, 1, 10, dtype=np.float32)
    np.testing.assert_array_equal(decode_update(encode_update(delta), 10), delta)
    bad = {
        "malformed_update": [b"", b"not safetensors at all", b"\xff" * 8 + b"{}",
                             save({"delta": delta, "extra": delta}), save({"weights": delta})],
        "wrong_dtype": [save({"delta": delta.astype(np.float64)}),
                        save({"delta": np.arange(10, dtype=np.int32)})],
        "wrong_shape": [save({"delta": delta[:9]}), save({"delta": delta.reshape(2, 5)})],
        "non_finite": [encode_update(np.where(np.arange(10) == 3, np.nan, delta).astype(np.float32)),
                       encode_update(np.where(np.arange(10) == 0, np.inf, delta).astype(np.float32))],
    }
    for code, bodies in bad.items():
        for body in bodies:
            with pytest.raises(InvalidUpdate) as e:
                decode_update(body, 10)
            assert e.value.code == code and e.value.http_status == 422


def test_decode_never_crashes_on_garbage():
    rng = np.random.default_rng(1)
    good = encode_update(np.ones(8, np.float32))
    for i in range(300):
        body = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            body[rng.integers(0, len(body))] = rng.integers(0, 256)
        body = bytes(body[: rng.integers(0, len(body) + 1)]) if i % 3 == 0 else bytes(body)
        try:
            decode_update(body, 8)
        except InvalidUpdate:
            pass


def test_partial_sums_copy_on_write_generations_and_garbage_collection(tmp_path):
    sums = PartialSums(tmp_path, shards=2)
    with sums.lease(7) as shard:
        assert shard in (0, 1)
        np.testing.assert_array_equal(sums.read(7, shard, 0, 4), np.zeros(4))
        sums.write(7, shard, 1, np.ones(4, np.float32))
        sums.write(7, shard, 2, np.full(4, 2, np.float32))
    fresh = PartialSums(tmp_path, shards=2)   # another process: no cache
    np.testing.assert_array_equal(fresh.read(7, shard, 2, 4), np.full(4, 2))
    with pytest.raises(OSError):
        fresh.read(7, shard, 2, 5)
    (tmp_path / "7" / f"{shard}.3.tmp").write_bytes(b"half")
    (tmp_path / "6").mkdir()
    (tmp_path / "12").mkdir()
    removed = fresh.collect({7: {shard: 2}}, newest_round=10)   # 6 closed; 12 opened after the snapshot
    assert removed == 3                                          # round 6, generation 1 and the tmp
    assert sorted(p.name for p in (tmp_path / "7").glob("*.f32")) == [f"{shard}.2.f32"]
    assert not (tmp_path / "6").exists() and (tmp_path / "12").exists()


def test_leases_are_exclusive_across_threads(tmp_path):
    sums = PartialSums(tmp_path, shards=2)
    holders: list[int] = []
    overlap = []
    lock = threading.Lock()

    def work():
        for _ in range(20):
            with sums.lease(1) as shard:
                with lock:
                    if shard in holders:
                        overlap.append(shard)
                    holders.append(shard)
                with lock:
                    holders.remove(shard)

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap
