"""The discover kind: federated discovery of new words (TrieHH), one level of a pass per round.

It owns the `discovery` and `discovery_votes` tables; the protocol's halves
are contract.tasks.discovery's. A population with
`[populations.<p>.discovery] every = N` starts a pass after every N completed
training rounds, then runs discover rounds, one per level, until the pass ends:

* an assignment carries the level and the frontier;
* each device's ballot is checked against the frontier (a 400 that changes
  nothing) and its votes counted, once per prefix, in the session's commit;
* when the round completes, prefixes with at least `min_devices` votes join
  the trie and every count is deleted, the sub-threshold ones included; a
  failed round's counts go too, and the level is retried.

When a pass ends, its new words take the vocabulary's free slots in a new
model version: each new word's rows of every tensor along a vocabulary axis
(the embedding row, the output layer's column and bias) start as copies of
`<oov>`'s, the token that stood for the word until now, so the new version
predicts exactly what the old one did, and training takes it from there. The
plan's graph does not depend on which word a slot holds, so the plan is
re-issued with the new vocabulary: the same plan file, a new vocabulary and a
new manifest naming both.

What the server sees: each device's ballot (prefixes one character longer
than ones at least min_devices devices voted for); what it keeps and
publishes: only prefixes and words of at least min_devices devices.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from contract.artifacts.manifest import Manifest, file_record, utc_now
from contract.model.text import OOV_ID, Vocabulary
from contract.model.weights import copy_token_rows
from contract.protocol.wire import DiscoveryAsk, DiscoveryBallot
from contract.tasks.discovery import Trie
from server.artifacts import ArtifactStore
from server.config import DiscoveryConfig, PopulationConfig
from server.errors import ErrorCode, ProtocolError
from server.populations import Plan, Population, load_population, set_vocabulary
from server.round import Round
from server.store import Row, Tx
from server.tasks import Contribution, KindBase, RoundHistory, RoundPlan
from server.versions import VersionRegistry

log = logging.getLogger(__name__)


class DiscoverKind(KindBase):
    name = "discover"

    def __init__(self, history: RoundHistory, versions: VersionRegistry, artifacts: ArtifactStore, settings):
        self._history, self._versions, self._artifacts, self._settings = history, versions, artifacts, settings

    @staticmethod
    def _row(conn: Tx, population: str) -> Row | None:
        return conn.execute("SELECT * FROM discovery WHERE population = ?", (population,)).fetchone()

    @staticmethod
    def _trie(row: Row, cfg: DiscoveryConfig) -> Trie:
        return Trie.resume(cfg.spec, row["level"], json.loads(row["frontier_json"]),
                           json.loads(row["pass_words_json"]))

    # -- opening ------------------------------------------------------------------------------

    def due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> bool:
        """A pass is running, or `every` training rounds completed since the last pass ended."""
        if cfg.discovery.every <= 0:
            return False
        row = self._row(tx, population.name)
        if row is not None and row["level"] > 0:
            return True
        ended = self._history.last_completed_number(tx, population.name, self.name)
        return self._history.completed_since(tx, population.name, "train", ended) >= cfg.discovery.every

    def plan(self, tx: Tx, population: Population, cfg: PopulationConfig, number: int) -> RoundPlan:
        return RoundPlan(goal=cfg.discovery.goal or None)   # votes are cheap: it may hear from more devices

    def opened(self, tx: Tx, rnd: Round) -> None:
        """A discover round opens: start a pass unless one is running."""
        tx.execute("INSERT INTO discovery (population) VALUES (?) ON CONFLICT (population) DO NOTHING",
                   (rnd.population,))
        if self._row(tx, rnd.population)["level"] == 0:
            tx.execute("UPDATE discovery SET pass = pass + 1, level = 1, frontier_json = '[\"\"]',"
                       " pass_words_json = '{}' WHERE population = ?", (rnd.population,))

    def assignment(self, tx: Tx, rnd: Round, population: Population, cfg: PopulationConfig) -> dict:
        row = self._row(tx, rnd.population)
        return {"discovery": DiscoveryAsk(row["level"], tuple(json.loads(row["frontier_json"])),
                                          cfg.discovery.spec)}

    # -- one ballot ---------------------------------------------------------------------------

    def check(self, conn: Tx, session: Row, rnd: Round, report: DiscoveryBallot) -> list[str]:
        """The ballot's votes if they extend the trie's frontier; a 400 otherwise (nothing stored)."""
        try:
            return self._trie(self._row(conn, rnd.population), self._settings(rnd.population).discovery).check(
                report.votes)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"votes: {e}") from None

    def record(self, tx: Tx, rnd: Round, session_id: str, contribution: Contribution) -> None:
        tx.executemany("INSERT INTO discovery_votes (round_id, prefix, votes) VALUES (?, ?, 1)"
                       " ON CONFLICT (round_id, prefix) DO UPDATE SET votes = discovery_votes.votes + 1",
                       [(rnd.id, p) for p in contribution.report])

    # -- finishing ----------------------------------------------------------------------------

    def finish(self, tx: Tx, rnd: Round) -> int | None:
        """Advance the pass; when it ends, a new version with its new words (if any slot is free)."""
        words = self._close_level(tx, rnd, self._settings(rnd.population).discovery)
        if not words:
            return None
        version = self._grow(tx, load_population(tx, rnd.population), rnd.number, words)
        log.info("round %s/%d: discovery found %d new words -> version %s", rnd.population, rnd.number,
                 len(words), version)
        return version

    def _close_level(self, tx: Tx, rnd: Round, cfg: DiscoveryConfig) -> list[str]:
        row = self._row(tx, rnd.population)
        trie = self._trie(row, cfg)
        trie.advance({r["prefix"]: r["votes"] for r in tx.execute(
            "SELECT prefix, votes FROM discovery_votes WHERE round_id = ?", (rnd.id,))})
        known = json.loads(row["words_json"])
        if not trie.done:
            tx.execute("UPDATE discovery SET level = ?, frontier_json = ?, pass_words_json = ? WHERE population = ?",
                       (trie.level, json.dumps(trie.frontier), json.dumps(trie.words), rnd.population))
            return []
        new = [w for w in trie.ranked() if w not in known]
        tx.execute("UPDATE discovery SET level = 0, frontier_json = '[]', pass_words_json = '{}', words_json = ?"
                   " WHERE population = ?", (json.dumps(known + new), rnd.population))
        return new

    def _grow(self, tx: Tx, pop: Population, round_number: int, words: list[str]) -> int | None:
        """A new version of `pop` with `words` in its vocabulary's free slots (as many as fit); its number,
        or None if no slot is free or the population has no vocabulary."""
        if pop.vocab_sha256 is None:
            return None
        vocab = Vocabulary.from_json(self._artifacts.read(pop.vocab_sha256).decode("utf-8"))
        slots = vocab.free_slots
        words = [w for w in words if vocab.id(w) == OOV_ID][:len(slots)]
        if not words:
            return None
        grown = vocab.with_words(words)
        vocab_sha = self._artifacts.put(grown.to_json().encode("utf-8"))
        parent = self._versions.get(pop.name, pop.current_version, tx)
        flat = copy_token_rows(self._versions.weights(parent), pop.layout, len(vocab), OOV_ID, slots[:len(words)])
        version = self._versions.add(tx, pop.name, pop.layout, pop.model_config, parent.version, round_number,
                                     flat, self._versions.optimizer_bytes(parent),
                                     {"source": "discovery", "new_words": len(words)}, vocab_sha256=vocab_sha)
        plan = self._reissue_plan(pop.plan, grown, vocab_sha) if pop.plan is not None else None
        set_vocabulary(tx, pop.name, vocab_sha, plan)
        return version.version

    def _reissue_plan(self, plan: Plan, vocab: Vocabulary, vocab_sha: str) -> Plan:
        """The plan's manifest with the new vocabulary (same plan file), stored; the new Plan."""
        manifest = Manifest.from_json(self._artifacts.read(plan.manifest_sha256).decode("utf-8"))
        data = vocab.to_json().encode("utf-8")
        files = {**manifest.files, manifest.vocab_file: file_record(data)}
        manifest = dataclasses.replace(manifest, vocab_sha256=vocab.sha256, files=files, created_at=utc_now())
        manifest_sha = self._artifacts.put(manifest.to_json().encode("utf-8"))
        return dataclasses.replace(plan, manifest_sha256=manifest_sha, vocab_sha256=vocab_sha)

    def discard(self, tx: Tx, rnd: Round, completed: bool) -> None:
        """A round's vote counts go when it closes, completed or failed."""
        tx.execute("DELETE FROM discovery_votes WHERE round_id = ?", (rnd.id,))

    # -- what operators see ---------------------------------------------------------------------

    def summary(self, conn: Tx, population: str) -> dict:
        """The pass and level, and every word discovered so far."""
        row = self._row(conn, population)
        if row is None:
            return {"pass": 0, "level": 0, "words": []}
        return {"pass": row["pass"], "level": row["level"], "words": json.loads(row["words_json"])}
