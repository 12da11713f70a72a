"""Model versions: each completed training round makes one (checkpoint + metrics + lineage).

Version 0 is the checkpoint a population was registered with; version n+1 is
version n after one round's server step, with `parent = n` and the round that
produced it. A checkpoint is a `contract.model.weights` safetensors file (metadata:
model_config, population, version, parent; "round" = the version, as in
simulation checkpoints), stored by content hash; the server optimizer's state
after that step is stored beside it in the private store, so training resumes
exactly after a restart.

Publishing: when an evaluation round of version v completes, v becomes a
publish candidate if at least `publish_every` versions separate it from the
published one and its federated top-3 recall (the keyboard's metric, see
contract.model.metrics) is not worse. The export itself runs later, out of the
request path (server.publisher). `rollback` points apps back at an earlier
exported version.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading

import numpy as np

from contract.model.canary import changed
from contract.model.weights import WeightLayout, load_checkpoint, save_checkpoint
from server import populations
from server.artifacts import ArtifactStore
from contract.clock import Clock
from server.errors import ErrorCode, ProtocolError
from server.optimizers import State, state_from_bytes
from server.store import Row, Store, Tx

log = logging.getLogger(__name__)
PUBLISH_METRIC = "top3"


@dataclasses.dataclass(frozen=True)
class Version:
    population: str
    version: int
    parent: int | None
    round_number: int | None
    checkpoint_sha256: str
    optimizer_sha256: str | None
    created_at: float
    train: dict
    eval: dict | None
    app_manifest_sha256: str | None
    published_at: float | None
    vocab_sha256: str | None = None     # None: the population's vocabulary at registration
    # published: the standing canary of its app model, and the probes that changed since the version
    # published before it ({"suggestions": {context: word}, "changed": {context: [before, after]}})
    canary: dict | None = None

    @classmethod
    def from_row(cls, row: Row) -> "Version":
        evaluation = json.loads(row["eval_json"]) if row["eval_json"] else None
        return cls(row["population"], row["version"], row["parent"], row["round_number"],
                   row["checkpoint_sha256"], row["optimizer_sha256"], row["created_at"],
                   json.loads(row["train_json"]), evaluation, row["app_manifest_sha256"],
                   row["published_at"], row["vocab_sha256"],
                   json.loads(row["canary_json"]) if row["canary_json"] else None)

    def to_json(self) -> dict:
        return {"version": self.version, "parent": self.parent, "round": self.round_number,
                "checkpoint_sha256": self.checkpoint_sha256, "created_at": self.created_at,
                "train": self.train, "eval": self.eval, "published_at": self.published_at,
                "app_manifest_sha256": self.app_manifest_sha256, "vocab_sha256": self.vocab_sha256,
                "canary": self.canary}


def add_initial_version(tx: Tx, population: str, checkpoint_sha256: str, now: float,
                        vocab_sha256: str | None) -> None:
    """Version 0 of a population being registered (server.registration)."""
    tx.execute("INSERT INTO versions (population, version, checkpoint_sha256, created_at, train_json,"
               " vocab_sha256) VALUES (?, 0, ?, ?, ?, ?)",
               (population, checkpoint_sha256, now, json.dumps({"source": "initial checkpoint"}), vocab_sha256))


def save_version_checkpoint(artifacts: ArtifactStore, layout: WeightLayout, flat: np.ndarray,
                            population: str, version: int, parent: int | None,
                            model_config: dict | None) -> str:
    """Write a version's checkpoint with `contract.model.weights.save_checkpoint`; returns its sha256."""
    scratch = artifacts.scratch_dir()
    try:
        meta = {"round": version, "population": population, "version": version, "parent": parent}
        if model_config is not None:
            meta["model_config"] = model_config
        path = save_checkpoint(scratch / "checkpoint.safetensors", layout, flat, meta)
        return artifacts.put_file(path, move=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class VersionRegistry:
    def __init__(self, store: Store, artifacts: ArtifactStore, private: ArtifactStore, clock: Clock):
        self._store = store
        self._artifacts = artifacts
        self._private = private
        self._clock = clock
        self._weights: dict[str, np.ndarray] = {}   # checkpoint sha256 → flat (the latest few)
        self._lock = threading.Lock()

    def get(self, population: str, version: int, conn: Tx | None = None) -> Version:
        conn = conn or self._store.connection()
        row = conn.execute("SELECT * FROM versions WHERE population = ? AND version = ?",
                           (population, version)).fetchone()
        if row is None:
            raise ProtocolError(ErrorCode.UNKNOWN_VERSION,
                                f"population {population!r} has no version {version}")
        return Version.from_row(row)

    def list(self, population: str, limit: int = 100, before: int | None = None) -> list[Version]:
        rows = self._store.connection().execute(
            "SELECT * FROM versions WHERE population = ? AND version < ? ORDER BY version DESC LIMIT ?",
            (population, before if before is not None else 2**62, limit)).fetchall()
        return [Version.from_row(r) for r in rows]

    def weights(self, version: Version) -> np.ndarray:
        """The flat weights of a version (read-only; cached for the next round)."""
        with self._lock:
            flat = self._weights.get(version.checkpoint_sha256)
        if flat is None:
            _, flat, _ = load_checkpoint(self._artifacts.path(version.checkpoint_sha256))
            flat.setflags(write=False)
            with self._lock:
                self._weights = {version.checkpoint_sha256: flat}
        return flat

    def optimizer_bytes(self, version: Version) -> bytes | None:
        return self._private.read(version.optimizer_sha256) if version.optimizer_sha256 else None

    def optimizer_state(self, version: Version) -> State | None:
        if version.optimizer_sha256 is None:
            return None
        return state_from_bytes(self._private.read(version.optimizer_sha256))

    def add(self, tx: Tx, population: str, layout: WeightLayout,
            model_config: dict | None, parent: int, round_number: int, flat: np.ndarray,
            optimizer_state: bytes | None, train: dict, vocab_sha256: str | None = None) -> Version:
        """Version parent + 1; `vocab_sha256`: its vocabulary if it is not its parent's."""
        version = parent + 1
        checkpoint_sha = save_version_checkpoint(self._artifacts, layout, flat, population,
                                                 version, parent, model_config)
        optimizer_sha = self._private.put(optimizer_state) if optimizer_state is not None else None
        if vocab_sha256 is None:
            vocab_sha256 = tx.execute("SELECT vocab_sha256 FROM versions WHERE population = ? AND version = ?",
                                      (population, parent)).fetchone()[0]
        tx.execute(
            "INSERT INTO versions (population, version, parent, round_number, checkpoint_sha256,"
            " optimizer_sha256, created_at, train_json, vocab_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (population, version, parent, round_number, checkpoint_sha, optimizer_sha,
             self._clock.now(), json.dumps(train), vocab_sha256))
        populations.set_current(tx, population, version)
        return self.get(population, version, tx)

    def record_eval(self, tx: Tx, population: str, version: int, result: dict,
                    publish_every: int) -> bool:
        """Attach an evaluation to a version; True if it should now be published."""
        tx.execute("UPDATE versions SET eval_json = ? WHERE population = ? AND version = ?",
                   (json.dumps(result), population, version))
        populations.set_evaluated(tx, population)
        published = populations.load_population(tx, population).published_version
        if publish_every <= 0 or result.get("positions", 0) <= 0:
            return False
        if published is None:
            return True
        last = self.get(population, published, tx)
        if version - last.version < publish_every:
            return False
        return last.eval is None or result[PUBLISH_METRIC] >= last.eval[PUBLISH_METRIC]

    def mark_published(self, tx: Tx, population: str, version: int,
                       manifest_sha256: str, canary: dict | None = None) -> None:
        """Make `version` the published one; `canary` (its manifest's) is kept with the probes that
        changed since the version published before it, and those are logged for the operator."""
        published = populations.load_population(tx, population).published_version
        before = tx.execute("SELECT canary_json FROM versions WHERE population = ? AND version = ?",
                            (population, published)).fetchone() if published is not None else None
        previous = json.loads(before[0])["suggestions"] if before and before[0] else None
        record = {"suggestions": canary, "changed": changed(previous, canary)} if canary else None
        if record and record["changed"]:
            log.warning("%s v%d: the canary's suggestions changed for %d probe(s): %s", population, version,
                        len(record["changed"]), record["changed"])
        tx.execute("UPDATE versions SET app_manifest_sha256 = ?, published_at = ?, canary_json = ?"
                   " WHERE population = ? AND version = ?",
                   (manifest_sha256, self._clock.now(), json.dumps(record) if record else None,
                    population, version))
        populations.set_published(tx, population, version)

    def published(self, population: str, version: int | None = None) -> Version:
        """The version apps should use (or a given exported version)."""
        if version is None:
            version = populations.load_population(self._store.connection(), population).published_version
            if version is None:
                raise ProtocolError(ErrorCode.NOT_PUBLISHED,
                                    f"population {population!r} has not published a model yet")
        found = self.get(population, version)
        if found.app_manifest_sha256 is None:
            raise ProtocolError(ErrorCode.NOT_PUBLISHED,
                                f"version {version} of {population!r} was never published")
        return found

    def rollback(self, population: str, to_version: int | None = None) -> Version:
        """Point apps at `to_version` (default: the exported version before the current one)."""
        with self._store.write() as tx:
            current = populations.load_population(tx, population).published_version
            if to_version is None:
                if current is None:
                    raise ProtocolError(ErrorCode.CONFLICT,
                                        f"{population!r} has nothing published to roll back")
                prev = tx.execute("SELECT MAX(version) FROM versions WHERE population = ? AND version < ?"
                                  " AND app_manifest_sha256 IS NOT NULL",
                                  (population, current)).fetchone()[0]
                if prev is None:
                    raise ProtocolError(ErrorCode.CONFLICT,
                                        f"no version of {population!r} was published before {current}")
                to_version = prev
            target = self.get(population, to_version, tx)
            if target.app_manifest_sha256 is None:
                raise ProtocolError(ErrorCode.CONFLICT,
                                    f"version {to_version} of {population!r} was never exported for apps")
            populations.set_published(tx, population, to_version)
            return target
