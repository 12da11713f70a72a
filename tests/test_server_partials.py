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
    removed = fresh.collect({7}, newest_round=10, committed=lambda r, k: 2)   # 6 closed; 12 opened later
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


def test_collection_reads_the_committed_generation_under_the_lease_not_from_a_snapshot(tmp_path):
    """Another process committed generation 1 after the collector's snapshot (which said 0):
    the file must survive, because the collector asks for the pointer while holding the shard."""
    sums = PartialSums(tmp_path, shards=1)
    sums.write(3, 0, 1, np.full(4, 5, np.int64))
    pointers = {0: 1}            # what SQLite says now
    removed = PartialSums(tmp_path, shards=1).collect({3}, newest_round=3,
                                                      committed=lambda r, k: pointers[k])
    assert removed == 0
    np.testing.assert_array_equal(PartialSums(tmp_path, shards=1).read(3, 0, 1, 4), np.full(4, 5))
