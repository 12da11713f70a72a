"""Federated discovery of new words over HTTP: discover rounds, one level of a TrieHH pass each.

The protocol's halves are contract.tasks.discovery's; this module owns the
`discovery` and `discovery_votes` tables and never waits for a device. A
population with `[populations.<p>.discovery] every = N` starts a pass after
every N completed training rounds; RoundService then opens discover rounds,
one per level, until the pass ends:

* an assignment carries the level and the frontier (`ask`);
* each device's ballot is checked against the frontier and its votes
  counted, once per prefix, in the session's commit (`record`);
* when the round completes, prefixes with at least `min_devices` votes join
  the trie and every count is deleted, the sub-threshold ones included
  (`close_level`); a failed round's counts go too, and the level is retried.

When a pass ends, its new words go to RoundService, which puts them in the
vocabulary's free slots of a new model version. What the server sees: each
device's ballot (prefixes one character longer than ones at least
min_devices devices voted for); what it keeps and publishes: only prefixes
and words of at least min_devices devices.
"""
from __future__ import annotations

import json
import sqlite3

from contract.tasks.discovery import Trie
from contract.protocol.wire import DiscoveryAsk, DiscoveryBallot
from server.config import DiscoveryConfig
from server.errors import ErrorCode, ProtocolError
from server.store import Store


class DiscoveryService:
    def __init__(self, store: Store):
        self._store = store

    def _row(self, conn: sqlite3.Connection, population: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM discovery WHERE population = ?", (population,)).fetchone()

    def _trie(self, row: sqlite3.Row, cfg: DiscoveryConfig) -> Trie:
        return Trie.resume(cfg.spec, row["level"], json.loads(row["frontier_json"]),
                           json.loads(row["pass_words_json"]))

    def due(self, conn: sqlite3.Connection, population: str, cfg: DiscoveryConfig) -> bool:
        """A pass is running, or enough training rounds completed since the last one."""
        if cfg.every <= 0:
            return False
        row = self._row(conn, population)
        return row is not None and (row["level"] > 0 or row["train_since"] >= cfg.every)

    def count_training(self, tx: sqlite3.Connection, population: str) -> None:
        tx.execute("INSERT INTO discovery (population, train_since) VALUES (?, 1) ON CONFLICT (population)"
                   " DO UPDATE SET train_since = discovery.train_since + 1", (population,))

    def open(self, tx: sqlite3.Connection, population: str) -> None:
        """A discover round opens: start a pass unless one is running."""
        if self._row(tx, population)["level"] == 0:
            tx.execute("UPDATE discovery SET pass = pass + 1, level = 1, frontier_json = '[\"\"]',"
                       " pass_words_json = '{}' WHERE population = ?", (population,))

    def ask(self, conn: sqlite3.Connection, population: str, cfg: DiscoveryConfig) -> DiscoveryAsk:
        row = self._row(conn, population)
        return DiscoveryAsk(row["level"], tuple(json.loads(row["frontier_json"])), cfg.spec)

    def record(self, tx: sqlite3.Connection, rnd, ballot: DiscoveryBallot, cfg: DiscoveryConfig) -> None:
        """Count one device's ballot (inside the session's commit); 422 for one off the trie."""
        votes = self.check(tx, rnd, ballot, cfg)
        tx.executemany("INSERT INTO discovery_votes (round_id, prefix, votes) VALUES (?, ?, 1)"
                       " ON CONFLICT (round_id, prefix) DO UPDATE SET votes = discovery_votes.votes + 1",
                       [(rnd.id, p) for p in votes])

    def check(self, conn: sqlite3.Connection, rnd, ballot: DiscoveryBallot, cfg: DiscoveryConfig) -> list[str]:
        """The ballot's votes if they extend the trie's frontier (called before the commit too, so a
        bad ballot is a 422 that changes nothing); ProtocolError otherwise."""
        try:
            return self._trie(self._row(conn, rnd.population), cfg).check(ballot.votes)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"votes: {e}") from None

    def close_level(self, tx: sqlite3.Connection, rnd, cfg: DiscoveryConfig) -> list[str]:
        """The round completed: advance the pass; the pass's new words if it ended (else [])."""
        row = self._row(tx, rnd.population)
        trie = self._trie(row, cfg)
        votes = {r["prefix"]: r["votes"] for r in tx.execute(
            "SELECT prefix, votes FROM discovery_votes WHERE round_id = ?", (rnd.id,))}
        trie.advance(votes)
        self.discard(tx, rnd.id)
        known = json.loads(row["words_json"])
        if not trie.done:
            tx.execute("UPDATE discovery SET level = ?, frontier_json = ?, pass_words_json = ? WHERE population = ?",
                       (trie.level, json.dumps(trie.frontier), json.dumps(trie.words), rnd.population))
            return []
        new = [w for w in trie.ranked() if w not in known]
        tx.execute("UPDATE discovery SET level = 0, frontier_json = '[]', pass_words_json = '{}', words_json = ?,"
                   " train_since = 0 WHERE population = ?", (json.dumps(known + new), rnd.population))
        return new

    def discard(self, tx: sqlite3.Connection, round_id: int) -> None:
        """A round's vote counts go when it closes, completed or failed."""
        tx.execute("DELETE FROM discovery_votes WHERE round_id = ?", (round_id,))

    def summary(self, conn: sqlite3.Connection, population: str) -> dict:
        """For the operator: the pass and level, and every word discovered so far."""
        row = self._row(conn, population)
        if row is None:
            return {"pass": 0, "level": 0, "words": []}
        return {"pass": row["pass"], "level": row["level"], "words": json.loads(row["words_json"])}
