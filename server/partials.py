"""The files behind a round's running sum: sharded, copy-on-write, durable.

A round's sum of accepted contributions (contract.update.pipeline: exact int64
integers in the round's units) is split over S shards so that S uploads can be
folded at once (by threads or by gunicorn worker processes). Shard k of round
r at generation g is the raw int64 file `<root>/<r>/<k>.<g>.i64`; the
`partials` table says which generation of each shard is committed. Accepting
an update (server.reporting) is:

1. lease a shard: an exclusive `flock` on `<root>/<r>/<k>.lock` (or, on
   PostgreSQL, an advisory lock), which works across threads, processes and
   replicas and is released if the holder dies;
2. read the committed generation g (cached in memory when this process wrote
   and committed it), add the update's integers, write generation g+1 to a
   temporary file and rename it into place;
3. in one database transaction: check the session and round are still open, move
   the shard's pointer to g+1, mark the session accepted, count it. COMMIT is
   the single point at which the update becomes part of the round.

A crash before 3 leaves the pointer at g: the g+1 file is an orphan that the
next writer of that shard overwrites (names are deterministic) or `collect`
removes; a crash after 3 only leaves g behind as garbage. So an update is
counted exactly once or not at all, and the device's retry (uploads are
idempotent per session) brings it in. Memory: one vector per cached shard.
Integer addition is exact and associative, so the shards merge to the same
sum whatever the order the updates arrived in.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from server.store import Row, Tx
from server.store.sqlite import FileLocks

SUFFIX = ".i64"


class PartialSums:
    def __init__(self, root: str | Path, shards: int, fsync: bool = False, locks=None, first_shard: int = 0):
        """`locks` leases shards across processes (server.store's FileLocks or the PostgreSQL
        backend's advisory locks); replica r of a deployment uses shards r*S .. r*S+S-1 and merges
        every replica's at close (server.tasks.train)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shards = shards
        self.first_shard = first_shard
        self._locks = locks or FileLocks(self.root)
        self._fsync = fsync
        self._cache: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        self._cache_lock = threading.Lock()

    def path(self, round_id: int, shard: int, generation: int) -> Path:
        return self.root / str(round_id) / f"{shard}.{generation}{SUFFIX}"

    @contextlib.contextmanager
    def lease(self, round_id: int) -> Iterator[int]:
        """Exclusive use of one of this replica's shards of a round: a free one if any, else wait."""
        (self.root / str(round_id)).mkdir(parents=True, exist_ok=True)
        start = random.randrange(self.shards)
        order = [self.first_shard + (start + i) % self.shards for i in range(self.shards)]
        for blocking in (False, True):
            for shard in order if not blocking else order[:1]:
                handle = self._locks.acquire(round_id, shard, blocking)
                if handle is None:
                    continue
                try:
                    yield shard
                finally:
                    self._locks.release(handle)
                return

    @staticmethod
    def commit(tx: Tx, round_id: int, shard: int, generation: int, weight: int) -> None:
        """Step 3 above: move the shard's pointer from `generation` to `generation + 1` (inside the
        report's transaction); the only writer of the `partials` table, with `drop`."""
        moved = tx.execute("UPDATE partials SET generation = generation + 1, weight = weight + ?,"
                           " count = count + 1 WHERE round_id = ? AND shard = ? AND generation = ?",
                           (weight, round_id, shard, generation)).rowcount
        if not moved:
            if generation != 0:
                raise RuntimeError(f"round {round_id} shard {shard} moved while leased")
            tx.execute("INSERT INTO partials (round_id, shard, generation, weight, count)"
                       " VALUES (?, ?, 1, ?, 1)", (round_id, shard, weight))

    @staticmethod
    def committed(conn: Tx, round_id: int, shard: int) -> tuple[int, int]:
        """A shard's committed (generation, number of updates in it); (0, 0) before its first."""
        row = conn.execute("SELECT generation, count FROM partials WHERE round_id = ? AND shard = ?",
                           (round_id, shard)).fetchone()
        return (row["generation"], row["count"]) if row else (0, 0)

    @staticmethod
    def committed_shards(conn: Tx, round_id: int) -> list[Row]:
        """Every committed shard of a round: shard, generation, weight, count."""
        return conn.execute("SELECT shard, generation, weight, count FROM partials WHERE round_id = ?"
                            " ORDER BY shard", (round_id,)).fetchall()

    @staticmethod
    def drop(tx: Tx, round_id: int) -> None:
        """A closing round's pointers (its files go after COMMIT: remove_round)."""
        tx.execute("DELETE FROM partials WHERE round_id = ?", (round_id,))

    def read(self, round_id: int, shard: int, generation: int, size: int) -> np.ndarray:
        """Generation `generation` of a shard (zeros for generation 0, which has no file)."""
        if generation == 0:
            return np.zeros(size, np.int64)
        with self._cache_lock:
            cached = self._cache.get((round_id, shard))
        if cached is not None and cached[0] == generation:
            return cached[1]
        data = np.fromfile(self.path(round_id, shard, generation), dtype=np.int64)
        if data.shape != (size,):
            raise OSError(f"partial sum {self.path(round_id, shard, generation)} is truncated")
        return data

    def write(self, round_id: int, shard: int, generation: int, total: np.ndarray) -> None:
        path = self.path(round_id, shard, generation)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            total.tofile(f)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def remember(self, round_id: int, shard: int, generation: int, total: np.ndarray) -> None:
        """Cache a generation this process wrote, once it is committed (never before: an
        uncommitted generation number may later be written by another process)."""
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] != round_id]:
                del self._cache[key]   # only the round being written is worth memory
            self._cache[(round_id, shard)] = (generation, total)

    def discard(self, round_id: int, shard: int, generation: int) -> None:
        """Forget a generation that was not (or is no longer) committed."""
        with contextlib.suppress(FileNotFoundError):
            self.path(round_id, shard, generation).unlink()
        with self._cache_lock:
            cached = self._cache.get((round_id, shard))
            if cached is not None and cached[0] == generation:
                del self._cache[(round_id, shard)]

    def remove_round(self, round_id: int) -> None:
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == round_id]:
                del self._cache[key]
        shutil.rmtree(self.root / str(round_id), ignore_errors=True)

    def collect(self, open_rounds: set[int], newest_round: int,
                committed: Callable[[int, int], int]) -> int:
        """Delete files no open round refers to.

        `open_rounds` were open in a snapshot in which `newest_round` was the
        highest round id. Directories of rounds newer than the snapshot are
        left alone (they may have opened since). A shard of an open round is
        cleaned only while holding its lease, and its committed generation is
        read then (`committed(round_id, shard)`), not from the snapshot: an
        upload commits while it holds the lease, so a generation committed by
        another process after the snapshot is never taken for garbage, and a
        writer between steps 2 and 3 above never loses its file.
        """
        removed = 0
        for directory in [d for d in self.root.iterdir() if d.is_dir()]:
            round_id = int(directory.name) if directory.name.isdigit() else -1
            if round_id > newest_round:
                continue
            if round_id not in open_rounds:
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
                continue
            shards = {int(f.name.split(".")[0]) for f in directory.iterdir() if f.name.split(".")[0].isdigit()}
            for shard in sorted(shards):
                handle = self._locks.acquire(round_id, shard, blocking=False)
                if handle is None:
                    continue
                try:
                    keep = f"{shard}.{committed(round_id, shard)}{SUFFIX}"
                    for f in directory.glob(f"{shard}.*"):
                        if f.suffix in (SUFFIX, ".tmp") and f.name != keep:
                            f.unlink(missing_ok=True)
                            removed += 1
                finally:
                    self._locks.release(handle)
        return removed
