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

from server import populations, sessions
from server.registry import Device
from server.store import Store, Tx


class ArtifactAccess:
    def __init__(self, store: Store):
        self._store = store

    def publish(self, tx: Tx, population: str, version: int, hashes: list[str]) -> None:
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
        pop = populations.load_population(conn, device.population) if populations.exists(
            conn, device.population) else None
        if pop is not None:
            plan = pop.plan
            if sha256 in {plan and plan.artifact_sha256, plan and plan.manifest_sha256, plan and plan.vocab_sha256,
                          pop.vocab_sha256} - {None}:
                return sessions.ever_assigned(conn, device.id, device.population)
        return sessions.was_given(conn, device.id, sha256)
