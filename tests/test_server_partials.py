"""The durable sharded running sum: copy-on-write generations, garbage collection, exclusive leases."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from server.partials import SUFFIX, PartialSums


def test_partial_sums_copy_on_write_generations_and_garbage_collection(tmp_path):
    sums = PartialSums(tmp_path, shards=2)
    with sums.lease(7) as shard:
        assert shard in (0, 1)
        np.testing.assert_array_equal(sums.read(7, shard, 0, 4), np.zeros(4, np.int64))
        assert sums.read(7, shard, 0, 4).dtype == np.int64
        sums.write(7, shard, 1, np.ones(4, np.int64))
        sums.write(7, shard, 2, np.full(4, 2**50, np.int64))
    fresh = PartialSums(tmp_path, shards=2)   # another process: no cache
    np.testing.assert_array_equal(fresh.read(7, shard, 2, 4), np.full(4, 2**50))   # exact, past float32
    with pytest.raises(OSError):
        fresh.read(7, shard, 2, 5)
    (tmp_path / "7" / f"{shard}.3.tmp").write_bytes(b"half")
    (tmp_path / "6").mkdir()
    (tmp_path / "12").mkdir()
    removed = fresh.collect({7: {shard: 2}}, newest_round=10)   # 6 closed; 12 opened after the snapshot
    assert removed == 3                                          # round 6, generation 1 and the tmp
    assert sorted(p.name for p in (tmp_path / "7").glob(f"*{SUFFIX}")) == [f"{shard}.2{SUFFIX}"]
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
