"""The `sessions` table: one row per device selected into a round, and the only code that writes it.

A session is assigned at check-in (server.checkin), then ends exactly once:
accepted (its report counted, server.reporting), aborted (a report the round
could not use), failed (the device said why), or dropped (no report before the
round closed, server.rounds). Every function runs inside the caller's write
transaction.
"""
from __future__ import annotations

import json


def assign(tx, session_id: str, round_id: int, device_id: str, seed: int, now: float, bytes_out: int) -> None:
    tx.execute("INSERT INTO sessions (id, round_id, device_id, seed, state, assigned_at, bytes_out)"
               " VALUES (?, ?, ?, ?, 'assigned', ?, ?)", (session_id, round_id, device_id, seed, now, bytes_out))


def finish(tx, session_id: str, state: str, reason: str | None, now: float) -> None:
    """End a session as accepted, aborted or failed (`reason` None keeps what the report set)."""
    if reason is None:
        tx.execute("UPDATE sessions SET state = ?, finished_at = ? WHERE id = ?", (state, now, session_id))
    else:
        tx.execute("UPDATE sessions SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                   (state, reason, now, session_id))


def record_report(tx, session_id: str, num_examples: int | None, metrics: dict, bytes_in: int | None = None,
                  norm: float | None = None, zeroed: bool = False) -> None:
    """What a counted report said: its weight, metrics, size and norm (None: unknown, e.g. masked)."""
    tx.execute("UPDATE sessions SET num_examples = COALESCE(?, num_examples), metrics_json = ?,"
               " bytes_in = COALESCE(?, bytes_in), norm = ?, reason = CASE WHEN ? = 1 THEN 'zeroed' ELSE reason END"
               " WHERE id = ?", (num_examples, json.dumps(metrics), bytes_in, norm, int(zeroed), session_id))


def drop_unreported(tx, round_id: int, now: float) -> int:
    """A closing round's sessions that never reported: dropped; how many."""
    return tx.execute("UPDATE sessions SET state = 'dropped', reason = 'no_report_before_close',"
                      " finished_at = ? WHERE round_id = ? AND state = 'assigned'", (now, round_id)).rowcount
