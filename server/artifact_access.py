"""Who may download which artifact (the `public_artifacts` table's one owner).

Artifacts are stored by content hash (server.artifacts), and knowing a hash
must not be enough to fetch a model no one has published:

* a published app model — its manifest and every file it lists — is public:
  keyboards fetch it without credentials (`publish` records it);
* a population's training plan, its manifest and vocabulary go to a device
  of that population that has been assigned a session;
* a version's checkpoint goes to a device assigned to a round that trains or
  evaluates that version;
* the operator may fetch anything.

Anything else answers 404, as if it did not exist.
"""
from __future__ import annotations

import json
import sqlite3

from server.registry import Device
from server.store import Store


class ArtifactAccess:
    def __init__(self, store: Store):
        self._store = store

    def publish(self, tx: sqlite3.Connection, population: str, version: int, hashes: list[str]) -> None:
        """Make a published app model's manifest and files public."""
        tx.executemany("INSERT INTO public_artifacts (sha256, population, version) VALUES (?, ?, ?)"
                       " ON CONFLICT DO NOTHING",
                       [(sha, population, version) for sha in hashes])

    def is_public(self, sha256: str) -> bool:
        return self._store.connection().execute(
            "SELECT 1 FROM public_artifacts WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def allowed(self, sha256: str, device: Device | None, operator: bool) -> bool:
        if operator or self.is_public(sha256):
            return True
        if device is None or device.population is None:
            return False
        conn = self._store.connection()
        row = conn.execute("SELECT plan_json, vocab_sha256 FROM populations WHERE name = ?",
                           (device.population,)).fetchone()
        if row is not None:
            plan = json.loads(row["plan_json"]) if row["plan_json"] else {}
            if sha256 in {plan.get("artifact_sha256"), plan.get("manifest_sha256"), plan.get("vocab_sha256"),
                          row["vocab_sha256"]} - {None}:
                return conn.execute("SELECT 1 FROM sessions s JOIN rounds r ON r.id = s.round_id WHERE"
                                    " s.device_id = ? AND r.population = ? LIMIT 1",
                                    (device.id, device.population)).fetchone() is not None
        return conn.execute(
            "SELECT 1 FROM sessions s JOIN rounds r ON r.id = s.round_id JOIN versions v"
            " ON v.population = r.population AND v.version = r.model_version"
            " WHERE s.device_id = ? AND v.checkpoint_sha256 = ? LIMIT 1", (device.id, sha256)).fetchone() is not None
