"""Reports from selected devices: model updates, evaluation results and failures.

Every report names a session; only the device the session was assigned to
may report on it (403 otherwise). Reports are idempotent per session: a
repeated upload gets the first answer again and is never counted twice.

The answer is `accepted` (counted in the round), or `aborted` (the round has
closed, passed its deadline or already has its goal of reports: the work is
not needed). An update that cannot be used at all — wrong model version, or
anything the round's update pipeline refuses (contract.update.pipeline: not its
format, another round's spec, a wrong width or length, a bad scale, a value
outside the grid, a norm above the clip, a weight above the cap) — raises a
4xx ProtocolError and changes nothing, so the device may retry with a good one.

How an upload is accepted atomically with its contribution to the running
sum: see server.partials (shard lease → new generation file → one
transaction that re-checks the session and round, moves the shard pointer and
marks the session accepted).
"""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Mapping

from contract.protocol.wire import DiscoveryBallot, EvalReport, Outcome
from server import sessions, telemetry
from contract.clock import Clock
from server.errors import ErrorCode, ProtocolError
from server.partials import PartialSums
from server.registry import DeviceRegistry
from server.rounds import Round, RoundService
from contract.tasks.personal import PersonalEvalReport
from server.discovery import DiscoveryService
from server.personal_eval import PersonalEvaluations
from server.secagg import SecAggService
from server.store import Store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Zeroed:
    """An accepted update the round counts as a report but does not add (its norm was too large)."""

    norm: float
    metrics: dict
    nbytes: int


class ReportingService:
    def __init__(self, store: Store, clock: Clock, rounds: RoundService, partials: PartialSums,
                 registry: DeviceRegistry, secagg: SecAggService, discovery: DiscoveryService,
                 personal: PersonalEvaluations):
        self._store = store
        self._personal = personal
        self._discovery = discovery
        self._clock = clock
        self._rounds = rounds
        self._partials = partials
        self._registry = registry
        self._secagg = secagg

    def _session(self, conn: sqlite3.Connection, device_id: str,
                 session_id: str) -> tuple[sqlite3.Row, Round]:
        row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id[:80]!r}")
        if row["device_id"] != device_id:
            raise ProtocolError(ErrorCode.NOT_YOUR_SESSION, "this session was assigned to another device")
        return row, self._rounds.by_id(conn, row["round_id"])

    def _check(self, session: sqlite3.Row, rnd: Round, task: str, model_version: int) -> Outcome | None:
        """The stored answer of a session that already ended, or None if it may report now."""
        if rnd.task != task:
            raise ProtocolError(ErrorCode.WRONG_TASK, f"session {session['id']} is a {rnd.task} task")
        if session["state"] == "accepted":
            return Outcome("accepted", rnd.number, "duplicate")
        if session["state"] == "aborted":
            return Outcome("aborted", rnd.number, session["reason"])
        if session["state"] == "failed":
            raise ProtocolError(ErrorCode.SESSION_CLOSED, "this session already reported a failure")
        if model_version != rnd.model_version:
            raise ProtocolError(ErrorCode.WRONG_MODEL_VERSION,
                                f"the session trains version {rnd.model_version}, not {model_version}")
        return None

    def session(self, device_id: str, session_id: str) -> tuple[sqlite3.Row, Round]:
        """A session the caller may act on (404 unknown, 403 another device's), and its round."""
        return self._session(self._store.connection(), device_id, session_id)

    def upload(self, device_id: str, session_id: str, body: bytes, model_version: int,
               num_examples: int | None, metrics: Mapping[str, float]) -> Outcome:
        conn = self._store.connection()
        session, rnd = self._session(conn, device_id, session_id)
        stored = self._check(session, rnd, "train", model_version)
        if stored is not None:
            return stored
        if rnd.secure and num_examples is not None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "under secure aggregation the weight travels "
                                "masked inside the update: send no num_examples")
        if not rnd.secure and num_examples is None:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "missing query parameter 'num_examples'")
        open_ = self._secagg.check_upload(conn, session, rnd) if rnd.secure else True   # 409: not now
        pipeline = self._rounds.pipeline(rnd)
        update = pipeline.accept(body, num_examples)      # 422 for anything the round cannot use
        if not open_ or not rnd.accepts_reports(self._clock.now()):
            return self._commit(session_id, rnd.id, None)
        if update.zeroed:     # far above what honest devices sent (contract.update.robust.zeroing_norm)
            return self._commit(session_id, rnd.id, Zeroed(update.norm, dict(metrics), len(body)))
        with self._partials.lease(rnd.id) as shard:
            part = conn.execute("SELECT generation, count FROM partials WHERE round_id = ? AND shard = ?",
                                (rnd.id, shard)).fetchone()
            generation = part["generation"] if part else 0
            stored = self._partials.read(rnd.id, shard, generation, pipeline.stored_size(part["count"] if part else 0))
            # into the new update's array, never the committed (maybe cached) one; a stack appends
            total = pipeline.fold(update.units, stored) if pipeline.linear else pipeline.fold(stored, update.units)
            try:
                self._partials.write(rnd.id, shard, generation + 1, total)
            except OSError:   # the round was closed and its directory removed meanwhile
                return self._commit(session_id, rnd.id, None)
            contribution = (shard, generation, update.weight, dict(metrics), len(body), update.norm)
            outcome = Outcome("aborted", rnd.number, "error")
            try:
                outcome = self._commit(session_id, rnd.id, contribution)
            finally:
                if outcome.counted:
                    self._partials.remember(rnd.id, shard, generation + 1, total)
                self._partials.discard(rnd.id, shard, generation if outcome.counted else generation + 1)
        return outcome

    def evaluation(self, device_id: str, session_id: str, model_version: int,
                   report: EvalReport) -> Outcome:
        session, rnd = self._session(self._store.connection(), device_id, session_id)
        stored = self._check(session, rnd, "eval", model_version)
        if stored is not None:
            return stored
        return self._commit(session_id, rnd.id, report)

    def personal(self, device_id: str, session_id: str, report: PersonalEvalReport) -> Outcome:
        """A device's personalization evaluation: checked (or masked) counts, added once to the round's sum."""
        conn = self._store.connection()
        session, rnd = self._session(conn, device_id, session_id)
        stored = self._check(session, rnd, "personalize", report.model_version)
        if stored is not None:
            return stored
        if report.masked != rnd.secure:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "this round's counts must be masked (secure aggregation)"
                                if rnd.secure else "this round is not securely aggregated: send plain counts")
        if rnd.secure and not self._secagg.check_upload(conn, session, rnd):   # 409: not now
            return self._commit(session_id, rnd.id, None)
        return self._commit(session_id, rnd.id, report)

    def discovery(self, device_id: str, session_id: str, model_version: int,
                  ballot: DiscoveryBallot) -> Outcome:
        """A device's votes in a discover round (server.discovery): checked, then counted once."""
        conn = self._store.connection()
        session, rnd = self._session(conn, device_id, session_id)
        stored = self._check(session, rnd, "discover", model_version)
        if stored is not None:
            return stored
        self._discovery.check(conn, rnd, ballot, self._rounds.settings(rnd.population).discovery)
        return self._commit(session_id, rnd.id, ballot)

    def failure(self, device_id: str, session_id: str, reason: str) -> Outcome:
        """A device stopped its task; `reason` is a code (contract.protocol.wire.FAILURE_REASONS), never text."""
        with self._store.write() as tx:
            session, rnd = self._session(tx, device_id, session_id)
            if session["state"] == "failed":
                return Outcome("recorded", rnd.number, session["reason"])
            if session["state"] not in ("assigned", "dropped"):
                raise ProtocolError(ErrorCode.SESSION_CLOSED, f"the session is already {session['state']}")
            self._fail_session(tx, session, rnd.id, reason)
        self._advance(rnd.population)
        return Outcome("recorded", rnd.number, reason)

    def end_sessions_of(self, tx: sqlite3.Connection, device_id: str) -> None:
        """A revoked device's open sessions fail now ("revoked"), so no round waits for them."""
        for session in tx.execute("SELECT s.* FROM sessions s JOIN rounds r ON r.id = s.round_id WHERE"
                                  " s.device_id = ? AND s.state = 'assigned' AND r.state IN"
                                  " ('selecting', 'reporting')", (device_id,)).fetchall():
            self._fail_session(tx, session, session["round_id"], "revoked")

    def _fail_session(self, tx: sqlite3.Connection, session: sqlite3.Row, round_id: int, reason: str) -> None:
        population = tx.execute("SELECT population FROM rounds WHERE id = ?", (round_id,)).fetchone()[0]
        telemetry.failure(self._store, population, reason)
        sessions.finish(tx, session["id"], "failed", reason, self._clock.now())
        self._rounds.count(tx, round_id, failed=1, dropped=-int(session["state"] == "dropped"))

    def _commit(self, session_id: str, round_id: int, contribution) -> Outcome:
        """The one transaction in which a report is counted (or the session aborted)."""
        now = self._clock.now()
        with self._store.write() as tx:
            population = tx.execute("SELECT population FROM rounds WHERE id = ?", (round_id,)).fetchone()[0]
            self._rounds.tick(tx, population)
            rnd = self._rounds.by_id(tx, round_id)
            session = tx.execute("SELECT state, reason FROM sessions WHERE id = ?",
                                 (session_id,)).fetchone()
            if session["state"] == "accepted":          # a concurrent duplicate won the race
                telemetry.upload(self._store, population, rnd.task, "duplicate")
                return Outcome("accepted", rnd.number, "duplicate")
            if session["state"] not in ("assigned", "dropped"):
                return Outcome("aborted", rnd.number, session["reason"])
            closed = rnd.secure and not self._secagg.accepting(tx, rnd.id)   # the sum's set is fixed
            if contribution is None or closed or not rnd.accepts_reports(now) or session["state"] == "dropped":
                return self._abort(tx, rnd, session_id, session["state"], now)
            nbytes = 0
            if isinstance(contribution, EvalReport):
                self._count_eval(tx, round_id, session_id, contribution)
            elif isinstance(contribution, PersonalEvalReport):
                self._personal.record(tx, round_id, contribution)
            elif isinstance(contribution, DiscoveryBallot):
                self._discovery.record(tx, rnd, contribution, self._rounds.settings(rnd.population).discovery)
            elif isinstance(contribution, Zeroed):
                sessions.record_report(tx, session_id, None, contribution.metrics, contribution.nbytes,
                                       contribution.norm, zeroed=True)
                self._rounds.count(tx, round_id, bytes_in=contribution.nbytes)
                nbytes = contribution.nbytes
            else:
                self._count_update(tx, round_id, session_id, *contribution)
                nbytes = contribution[4]
            device = tx.execute("SELECT device_id FROM sessions WHERE id = ?", (session_id,)).fetchone()[0]
            self._registry.record_participation(tx, device, now)
            sessions.finish(tx, session_id, "accepted", None, now)
            self._rounds.count(tx, round_id, reported=1)
            telemetry.upload(self._store, population, rnd.task, "accepted", nbytes)
            rnd = self._rounds.by_id(tx, round_id)
        if rnd.reported >= rnd.goal or (rnd.state == "reporting" and rnd.outstanding <= 0):
            self._advance(population)
        return Outcome("accepted", rnd.number, counted=True)

    def _abort(self, tx: sqlite3.Connection, rnd: Round, session_id: str, state: str,
               now: float) -> Outcome:
        """A report the round cannot use: after its deadline, after it closed, or surplus."""
        if now >= rnd.deadline:
            reason = "late"
        elif state == "dropped" or not rnd.is_open:
            reason = "round_closed"
        else:
            reason = "goal_reached"
        sessions.finish(tx, session_id, "aborted", reason, now)
        self._rounds.count(tx, rnd.id, aborted=1, dropped=-int(state == "dropped"))
        telemetry.upload(self._store, rnd.population, rnd.task, reason)
        return Outcome("aborted", rnd.number, reason)

    def _count_update(self, tx: sqlite3.Connection, round_id: int, session_id: str, shard: int,
                      generation: int, weight: int, metrics: dict, nbytes: int, norm: float) -> None:
        self._partials.commit(tx, round_id, shard, generation, weight)
        self._rounds.add_metrics(tx, round_id, metrics, weight)
        self._rounds.count(tx, round_id, weight_sum=weight, bytes_in=nbytes)
        sessions.record_report(tx, session_id, int(weight), metrics, nbytes, norm or None)   # masked: unknown (0)

    def _count_eval(self, tx: sqlite3.Connection, round_id: int, session_id: str,
                    report: EvalReport) -> None:
        counts = {k: v for k, v in report.to_json().items() if k != "model_version"}
        self._rounds.add_metrics(tx, round_id, counts)
        sessions.record_report(tx, session_id, report.positions, counts)

    def _advance(self, population: str) -> None:
        """Close the round if this report completed it; a failure here must not undo the report."""
        try:
            self._rounds.advance(population)
        except Exception:   # the ticker and the next request retry the transition
            log.exception("closing a round of %s failed; will retry", population)
