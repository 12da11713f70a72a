"""Federated personalization evaluation (the `personal_evals` table's one owner).

A personalize round is scheduled like an evaluation round, every
`personal_eval_every` completed training rounds of a population with a
`[personalization]` table. Each selected phone personalizes the round's
model on the first 80% of its text and scores the global and the personal
model on the rest (contract.tasks.personal.evaluate); its report is one vector of
counts (contract.tasks.personal.PersonalReport), checked and then added to the
round's running sum in the transaction that counts it. Only the sum is
stored — no row holds one device's figures. Under secure aggregation the
reports arrive masked (contract.secagg.masking), the sum is kept modulo 2^32 and
unmasked when the round completes, and only that sum is checked. The
round's detail shows what the sum says: both models' top-1, the per-device top-1 histograms and
the fractions helped, hurt and fallen back (contract.tasks.personal.summarize),
with the fairness figures the histograms allow.
"""
from __future__ import annotations

import json
import sqlite3

import numpy as np

from contract.tasks.personal import PersonalEvalReport, check_counts, fairness_from_histogram, summarize
from contract.secagg.masking import WORD_MODULUS

RETRIES = 1               # a failed personalize round is tried again this often, at once


class PersonalEvaluations:
    def due(self, conn: sqlite3.Connection, population: str, every: int) -> bool:
        """Whether `every` training rounds have completed since the last personalize round that counts:
        the last completed one, or the last one that failed on its retry (a failed round is tried again
        once, at once; then training goes on, so a failing evaluation never stalls training)."""
        if not every:
            return False
        row = conn.execute("SELECT number, state, attempt FROM rounds WHERE population = ? AND"
                           " task = 'personalize' ORDER BY number DESC LIMIT 1", (population,)).fetchone()
        if row is not None and row["state"] == "failed" and row["attempt"] >= 1 + RETRIES:
            last = row["number"]
        else:
            last = conn.execute("SELECT MAX(number) FROM rounds WHERE population = ? AND task = 'personalize'"
                                " AND state = 'completed'", (population,)).fetchone()[0] or 0
        done = conn.execute("SELECT COUNT(*) FROM rounds WHERE population = ? AND task = 'train' AND"
                            " state = 'completed' AND number > ?", (population, last)).fetchone()[0]
        return done >= every

    def record(self, tx: sqlite3.Connection, round_id: int, report: PersonalEvalReport) -> None:
        """Add one device's counts to the round's sum: checked ones as integers, masked ones (secure
        aggregation) modulo 2^32, to be unmasked when the round completes (`unmasked`)."""
        row = tx.execute("SELECT counts_json, devices FROM personal_evals WHERE round_id = ?",
                         (round_id,)).fetchone()
        counts = np.asarray(report.counts, np.int64)
        if row is None:
            tx.execute("INSERT INTO personal_evals (round_id, counts_json, devices) VALUES (?, ?, 1)",
                       (round_id, json.dumps(counts.tolist())))
            return
        stored = np.asarray(json.loads(row["counts_json"]), np.int64)
        if report.masked:
            total = (stored + counts) % WORD_MODULUS
        else:
            total = check_counts(stored, row["devices"]) + counts
        tx.execute("UPDATE personal_evals SET counts_json = ?, devices = devices + 1 WHERE round_id = ?",
                   (json.dumps(total.tolist()), round_id))

    def masked_sum(self, conn: sqlite3.Connection, round_id: int) -> np.ndarray | None:
        """A secure round's sum of masked reports (uint32 words), None if nothing was counted."""
        row = conn.execute("SELECT counts_json FROM personal_evals WHERE round_id = ?", (round_id,)).fetchone()
        return None if row is None else np.asarray(json.loads(row["counts_json"]), np.int64).astype(np.uint32)

    def unmasked(self, tx: sqlite3.Connection, round_id: int, plain: np.ndarray, survivors: int) -> None:
        """Replace a secure round's masked sum by its unmasked one, checked as the sum of `survivors`
        reports (ValueError if it is not one: a device sent counts no honest device could)."""
        total = check_counts([int(x) for x in np.asarray(plain, np.int64)], survivors)
        tx.execute("UPDATE personal_evals SET counts_json = ?, devices = ? WHERE round_id = ?",
                   (json.dumps(total.tolist()), survivors, round_id))

    def summary(self, conn: sqlite3.Connection, round_id: int) -> dict | None:
        """What the round's sum says (None: no report counted)."""
        row = conn.execute("SELECT counts_json FROM personal_evals WHERE round_id = ?", (round_id,)).fetchone()
        if row is None:
            return None
        out = summarize(json.loads(row["counts_json"]))
        h = out["histogram"]
        out["fairness"] = {"global": fairness_from_histogram(h["global"]),
                           "personal": fairness_from_histogram(h["personal"])}
        return out

    def latest(self, conn: sqlite3.Connection, population: str) -> dict | None:
        """The summary of the population's last completed personalize round, with its number."""
        row = conn.execute("SELECT r.id, r.number, r.model_version FROM rounds r JOIN personal_evals p ON"
                           " p.round_id = r.id WHERE r.population = ? AND r.state = 'completed'"
                           " ORDER BY r.number DESC LIMIT 1", (population,)).fetchone()
        if row is None:
            return None
        return {"round": row["number"], "model_version": row["model_version"], **self.summary(conn, row["id"])}

    def discard(self, tx: sqlite3.Connection, round_id: int) -> None:
        """A failed round's partial sum goes (nothing of it is reported)."""
        tx.execute("DELETE FROM personal_evals WHERE round_id = ?", (round_id,))
