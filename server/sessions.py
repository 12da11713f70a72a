"""The `sessions` table: one row per device selected into a round; the only code that writes or reads it.

A session is assigned at check-in (server.checkin), then ends exactly once:
accepted (its report counted, server.reporting), aborted (a report the round
could not use), failed (the device said why), or dropped (no report before the
round closed, server.rounds). A session also records its population and the
checkpoint it was given, so who may download what (server.artifact_access)
and who took part when (participation rules, analytics) are answered here
without reading another service's table. Every function takes the caller's
transaction or connection.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

from server.store import Row, Tx

ASSIGNED, ACCEPTED = "assigned", "accepted"


# -- writes ----------------------------------------------------------------------------------


def assign(tx: Tx, session_id: str, round_id: int, device_id: str, seed: int, now: float, bytes_out: int,
           population: str, checkpoint_sha256: str) -> None:
    tx.execute("INSERT INTO sessions (id, round_id, device_id, seed, state, assigned_at, bytes_out, population,"
               " checkpoint_sha256) VALUES (?, ?, ?, ?, 'assigned', ?, ?, ?, ?)",
               (session_id, round_id, device_id, seed, now, bytes_out, population, checkpoint_sha256))


def finish(tx: Tx, session_id: str, state: str, reason: str | None, now: float) -> None:
    """End a session as accepted, aborted or failed (`reason` None keeps what the report set)."""
    if reason is None:
        tx.execute("UPDATE sessions SET state = ?, finished_at = ? WHERE id = ?", (state, now, session_id))
    else:
        tx.execute("UPDATE sessions SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                   (state, reason, now, session_id))


def record_report(tx: Tx, session_id: str, num_examples: int | None, metrics: dict, bytes_in: int | None = None,
                  norm: float | None = None, zeroed: bool = False) -> None:
    """What a counted report said: its weight, metrics, size and norm (None: unknown, e.g. masked)."""
    tx.execute("UPDATE sessions SET num_examples = COALESCE(?, num_examples), metrics_json = ?,"
               " bytes_in = COALESCE(?, bytes_in), norm = ?, reason = CASE WHEN ? = 1 THEN 'zeroed' ELSE reason END"
               " WHERE id = ?", (num_examples, json.dumps(metrics), bytes_in, norm, int(zeroed), session_id))


def drop_unreported(tx: Tx, round_id: int, now: float) -> int:
    """A closing round's sessions that never reported: dropped; how many."""
    return tx.execute("UPDATE sessions SET state = 'dropped', reason = 'no_report_before_close',"
                      " finished_at = ? WHERE round_id = ? AND state = 'assigned'", (now, round_id)).rowcount


# -- reads -----------------------------------------------------------------------------------


def get(conn: Tx, session_id: str) -> Row | None:
    return conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()


def of_device(conn: Tx, round_id: int, device_id: str) -> Row | None:
    """The device's session in a round, if it was selected into it."""
    return conn.execute("SELECT * FROM sessions WHERE round_id = ? AND device_id = ?",
                        (round_id, device_id)).fetchone()


def of_round(conn: Tx, round_id: int) -> list[Row]:
    return conn.execute("SELECT * FROM sessions WHERE round_id = ? ORDER BY assigned_at, id",
                        (round_id,)).fetchall()


def states(conn: Tx, round_id: int) -> dict[str, str]:
    """session id → state, for every session of a round."""
    return {r["id"]: r["state"] for r in conn.execute("SELECT id, state FROM sessions WHERE round_id = ?",
                                                     (round_id,))}


def assigned_of_device(conn: Tx, device_id: str) -> list[Row]:
    """The device's sessions that have not ended (the rounds they belong to may have closed)."""
    return conn.execute("SELECT * FROM sessions WHERE device_id = ? AND state = 'assigned'",
                        (device_id,)).fetchall()


def norms(conn: Tx, round_id: int, with_zeroed: bool = True) -> list[float]:
    """The norms of a round's accepted updates that have one (plain rounds; masked ones are unknown)."""
    sql = "SELECT norm FROM sessions WHERE round_id = ? AND state = 'accepted' AND norm IS NOT NULL"
    if not with_zeroed:
        sql += " AND (reason IS NULL OR reason != 'zeroed')"
    return [r["norm"] for r in conn.execute(sql, (round_id,))]


def accepted_devices(conn: Tx, round_id: int) -> list[str]:
    """The devices whose reports a round counted."""
    return [r["device_id"] for r in conn.execute("SELECT device_id FROM sessions WHERE round_id = ? AND"
                                                 " state = 'accepted'", (round_id,))]


def zeroed(conn: Tx, round_id: int) -> int:
    """Reports of the round that were counted but not added (contract.update.robust.zeroing_norm)."""
    return conn.execute("SELECT COUNT(*) FROM sessions WHERE round_id = ? AND state = 'accepted'"
                        " AND reason = 'zeroed'", (round_id,)).fetchone()[0]


def failure_reasons(conn: Tx, round_id: int) -> dict[str, int]:
    return {r["reason"] or "unknown": r["n"] for r in conn.execute(
        "SELECT reason, COUNT(*) AS n FROM sessions WHERE round_id = ? AND state = 'failed' GROUP BY reason",
        (round_id,))}


def took_part(conn: Tx, device_id: str, round_ids: Iterable[int]) -> int:
    """In how many of `round_ids` the device was selected and has not failed or dropped out: its update
    is in the round's sum or may still be (participation rules count these)."""
    ids = list(round_ids)
    if not ids:
        return 0
    return conn.execute(f"SELECT COUNT(*) FROM sessions WHERE device_id = ? AND state IN ('assigned', 'accepted')"
                        f" AND round_id IN ({','.join('?' * len(ids))})", (device_id, *ids)).fetchone()[0]


def ever_assigned(conn: Tx, device_id: str, population: str) -> bool:
    """Whether the device was ever selected into a round of the population (it may fetch the plan)."""
    return conn.execute("SELECT 1 FROM sessions WHERE device_id = ? AND population = ? LIMIT 1",
                        (device_id, population)).fetchone() is not None


def was_given(conn: Tx, device_id: str, checkpoint_sha256: str) -> bool:
    """Whether a session of the device was assigned this checkpoint."""
    return conn.execute("SELECT 1 FROM sessions WHERE device_id = ? AND checkpoint_sha256 = ? LIMIT 1",
                        (device_id, checkpoint_sha256)).fetchone() is not None


def participation(conn: Tx, population: str, since: float) -> list[Row]:
    """When the population's devices were selected and finished, since `since` (server clock)."""
    return conn.execute("SELECT assigned_at, finished_at, state FROM sessions WHERE population = ?"
                        " AND assigned_at >= ?", (population, since)).fetchall()
