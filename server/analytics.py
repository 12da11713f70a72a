"""Round analytics for operators: what each round selected, received and decided.

Counts come from the round row (kept in the same transactions that change
sessions); phase durations from its timestamps (server.round.phases). Every
table is read through its owner: rounds through server.rounds, sessions
through server.sessions, secure aggregation's phases through server.secagg,
and what a kind adds to its round's detail through the kind (server.tasks).
"""
from __future__ import annotations

import json

from server import populations, sessions
from server.errors import ErrorCode, ProtocolError
from server.round import Round, phases
from server.rounds import RoundService
from server.secagg import SecAggService
from server.store import Row, Store, Tx
from server.tasks import TaskRegistry


def round_summary(row: Row, now: float) -> dict:
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

    def __init__(self, store: Store, pseudonym, rounds: RoundService, kinds: TaskRegistry, secagg: SecAggService):
        self._store = store
        self._pseudonym = pseudonym
        self._rounds, self._kinds, self._secagg = rounds, kinds, secagg

    @staticmethod
    def _population_exists(conn: Tx, population: str) -> None:
        if not populations.exists(conn, population):
            raise ProtocolError(ErrorCode.UNKNOWN_POPULATION, f"no population named {population!r}")

    def list(self, population: str, now: float, limit: int = 50, before: int | None = None) -> list[dict]:
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = self._rounds.rows(conn, population, limit, before)
        return [round_summary(r, now) for r in rows]

    def detail(self, population: str, number: int, now: float) -> dict:
        with self._store.read() as conn:
            self._population_exists(conn, population)
            row = self._rounds.row(conn, population, number)
            if row is None:
                raise ProtocolError(ErrorCode.UNKNOWN_ROUND,
                                    f"population {population!r} has no round {number}")
            rnd = Round.from_row(row)
            devices = sessions.of_round(conn, rnd.id)
            reasons = sessions.failure_reasons(conn, rnd.id)
            secure = self._secagg.summary(conn, rnd.id)
            if secure is not None:       # sessions → the pseudonyms of their devices
                secure["wrong_revealers"] = [self._pseudonym(sessions.get(conn, sid)["device_id"])
                                             for sid in secure["wrong_revealers"]]
            extra = self._kinds[rnd.task].detail(conn, rnd)
        out = round_summary(row, now)
        out["hyperparameters"] = json.loads(row["hyperparameters_json"])
        out["update"] = json.loads(row["update_spec_json"]) if row["update_spec_json"] else None
        out["failure_reasons"] = reasons
        # counted but not added: their norm was above the round's zeroing_norm (contract.update.robust)
        out["zeroed"] = sum(s["state"] == "accepted" and s["reason"] == "zeroed" for s in devices)
        # secure aggregation: the phase, the graph's degree k and threshold t, and how many devices
        # advertised keys and made the graph (members), shared, and were summed (survivors)
        out["secagg"] = secure
        # what the round's kind adds (personalize rounds: what the summed reports say; no device's own figures)
        out["personalization"] = None
        out.update(extra)
        out["devices"] = [{
            "device": self._pseudonym(s["device_id"]), "session_id": s["id"], "outcome": s["state"],
            "reason": s["reason"], "assigned_at": s["assigned_at"], "finished_at": s["finished_at"],
            "num_examples": s["num_examples"], "bytes_in": s["bytes_in"], "bytes_out": s["bytes_out"],
            "metrics": json.loads(s["metrics_json"]) if s["metrics_json"] else None,
        } for s in devices]
        return out

    def participation(self, population: str, since: float) -> dict[str, list[float]]:
        """When devices were selected and when they reported (server clock), since `since`."""
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = sessions.participation(conn, population, since)
        return {"selected": [r["assigned_at"] for r in rows],
                "reported": [r["finished_at"] for r in rows if r["state"] == "accepted" and r["finished_at"]]}

    def health(self, population: str, limit: int = 30) -> list[dict]:
        """Per training round: the update spec (bits, clip, zeroing limit), how many reports were at the
        clip or zeroed, and secure aggregation's counts per phase. Norms are unknown under SecAgg."""
        with self._store.read() as conn:
            self._population_exists(conn, population)
            rows = self._rounds.rows(conn, population, limit, task="train")
            out = []
            for row in reversed(rows):
                spec = json.loads(row["update_spec_json"])
                clip = spec.get("clip_norm")
                norms = sessions.norms(conn, row["id"], with_zeroed=False)
                zeroed = sessions.zeroed(conn, row["id"])
                secure = self._secagg.summary(conn, row["id"])
                out.append({"round": row["number"], "state": row["state"], "reported": row["reported"],
                            "bits": spec.get("bits"), "clip_norm": clip,
                            "zeroing_limit": spec.get("zeroing_norm") or None,
                            # a report whose norm reached 99.9% of the clip was (almost surely) scaled down to it
                            "at_clip": sum(n >= 0.999 * clip for n in norms) if clip else None,
                            "norms_known": len(norms), "zeroed": zeroed,
                            "secagg": {k: secure[k] for k in ("phase", "members", "shared", "survivors")}
                            if secure is not None else None})
        return out
