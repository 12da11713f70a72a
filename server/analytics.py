"""Round analytics for operators: what each round selected, received and decided.

Counts come from the round row (kept in the same transactions that change
sessions); phase durations from its timestamps: selection = opened → selection
closed, reporting = selection closed → closed, finalize = the time spent
aggregating, stepping the optimizer and writing the new version.
"""
from __future__ import annotations

import json
import sqlite3

from server.errors import ErrorCode, ProtocolError
from server.store import Store


def phases(row: sqlite3.Row, now: float) -> dict:
    selection_end = row["selection_closed_at"] or row["closed_at"] or now
    reporting = ((row["closed_at"] or now) - selection_end) if row["selection_closed_at"] else 0.0
    return {"selection_s": selection_end - row["opened_at"], "reporting_s": reporting,
            "finalize_s": row["finalize_s"]}


def round_summary(row: sqlite3.Row, now: float) -> dict:
    return {
        "round": row["number"], "task": row["task"], "state": row["state"], "reason": row["reason"],
        "model_version": row["model_version"], "attempt": row["attempt"],
        "result_version": row["result_version"],
        "goal": row["goal"], "max_selected": row["max_selected"], "min_reports": row["min_reports"],
        "selected": row["selected"], "reported": row["reported"], "aborted": row["aborted"],
        "failed": row["failed"], "dropped": row["dropped"],
        "bytes_in": row["bytes_in"], "bytes_out": row["bytes_out"],
        "opened_at": row["opened_at"], "deadline": row["deadline"], "closed_at": row["closed_at"],
        "phases": phases(row, now),
    }


class RoundAnalytics:
    """Operator views: devices appear under their pseudonym (server.keys), never their id."""

    def __init__(self, store: Store, pseudonym, personal=None):
        self._store = store
        self._pseudonym = pseudonym
        self._personal = personal          # server.personal_eval.PersonalEvaluations (reads its sums)

    def _population_exists(self, conn: sqlite3.Connection, population: str) -> None:
        if conn.execute("SELECT 1 FROM populations WHERE name = ?", (population,)).fetchone() is None:
            raise ProtocolError(ErrorCode.UNKNOWN_POPULATION, f"no population named {population!r}")

    def list(self, population: str, now: float, limit: int = 50, before: int | None = None) -> list[dict]:
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = conn.execute("SELECT * FROM rounds WHERE population = ? AND number < ?"
                                " ORDER BY number DESC LIMIT ?",
                                (population, before if before is not None else 2**62, limit)).fetchall()
        return [round_summary(r, now) for r in rows]

    def detail(self, population: str, number: int, now: float) -> dict:
        with self._store.read() as conn:
            self._population_exists(conn, population)
            row = conn.execute("SELECT * FROM rounds WHERE population = ? AND number = ?",
                               (population, number)).fetchone()
            if row is None:
                raise ProtocolError(ErrorCode.UNKNOWN_ROUND,
                                    f"population {population!r} has no round {number}")
            sessions = conn.execute("SELECT * FROM sessions WHERE round_id = ? ORDER BY assigned_at, id",
                                    (row["id"],)).fetchall()
            reasons = conn.execute("SELECT reason, COUNT(*) AS n FROM sessions WHERE round_id = ? AND"
                                   " state = 'failed' GROUP BY reason", (row["id"],)).fetchall()
            secure = conn.execute("SELECT phase, k, t, members, shared, survivors, reason FROM secagg_rounds"
                                  " WHERE round_id = ?", (row["id"],)).fetchone()
            # a secure round's sum means something only once unmasked, when it completes
            personal = (self._personal.summary(conn, row["id"])
                        if self._personal is not None and row["task"] == "personalize"
                        and (secure is None or row["state"] == "completed") else None)
        out = round_summary(row, now)
        out["hyperparameters"] = json.loads(row["hyperparameters_json"])
        out["update"] = json.loads(row["update_spec_json"]) if row["update_spec_json"] else None
        out["failure_reasons"] = {r["reason"] or "unknown": r["n"] for r in reasons}
        # counted but not added: their norm was above the round's zeroing_norm (contract.update.robust)
        out["zeroed"] = sum(s["state"] == "accepted" and s["reason"] == "zeroed" for s in sessions)
        # secure aggregation: the phase, the graph's degree k and threshold t, and how many devices
        # advertised keys and made the graph (members), shared, and were summed (survivors)
        out["secagg"] = dict(secure) if secure is not None else None
        # personalize rounds: what the summed reports say (server.personal_eval); no device's own figures
        out["personalization"] = personal
        out["devices"] = [{
            "device": self._pseudonym(s["device_id"]), "session_id": s["id"], "outcome": s["state"],
            "reason": s["reason"], "assigned_at": s["assigned_at"], "finished_at": s["finished_at"],
            "num_examples": s["num_examples"], "bytes_in": s["bytes_in"], "bytes_out": s["bytes_out"],
            "metrics": json.loads(s["metrics_json"]) if s["metrics_json"] else None,
        } for s in sessions]
        return out

    def participation(self, population: str, since: float) -> dict[str, list[float]]:
        """When devices were selected and when they reported (server clock), since `since`."""
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = conn.execute("SELECT s.assigned_at, s.finished_at, s.state FROM sessions s JOIN rounds r"
                                " ON r.id = s.round_id WHERE r.population = ? AND s.assigned_at >= ?",
                                (population, since)).fetchall()
        return {"selected": [r["assigned_at"] for r in rows],
                "reported": [r["finished_at"] for r in rows if r["state"] == "accepted" and r["finished_at"]]}

    def health(self, population: str, limit: int = 30) -> list[dict]:
        """Per training round: the update spec (bits, clip, zeroing limit), how many reports were at the
        clip or zeroed, and secure aggregation's counts per phase. Norms are unknown under SecAgg."""
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = conn.execute("SELECT * FROM rounds WHERE population = ? AND task = 'train' AND"
                                " update_spec_json IS NOT NULL ORDER BY number DESC LIMIT ?",
                                (population, limit)).fetchall()
            out = []
            for row in reversed(rows):
                spec = json.loads(row["update_spec_json"])
                clip = spec.get("clip_norm")
                norms = [r["norm"] for r in conn.execute(
                    "SELECT norm FROM sessions WHERE round_id = ? AND state = 'accepted' AND norm IS NOT NULL"
                    " AND (reason IS NULL OR reason != 'zeroed')", (row["id"],))]
                zeroed = conn.execute("SELECT COUNT(*) FROM sessions WHERE round_id = ? AND state = 'accepted'"
                                      " AND reason = 'zeroed'", (row["id"],)).fetchone()[0]
                secure = conn.execute("SELECT phase, members, shared, survivors FROM secagg_rounds WHERE"
                                      " round_id = ?", (row["id"],)).fetchone()
                out.append({"round": row["number"], "state": row["state"], "reported": row["reported"],
                            "bits": spec.get("bits"), "clip_norm": clip,
                            "zeroing_limit": spec.get("zeroing_norm") or None,
                            # a report whose norm reached 99.9% of the clip was (almost surely) scaled down to it
                            "at_clip": sum(n >= 0.999 * clip for n in norms) if clip else None,
                            "norms_known": len(norms), "zeroed": zeroed,
                            "secagg": dict(secure) if secure is not None else None})
        return out
