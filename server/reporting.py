"""Reports from selected devices: the session, idempotency, and the one commit that counts a report.

Every report names a session; only the device the session was assigned to
may report on it (403 otherwise), and only the report of the session's task
kind (409 otherwise). Reports are idempotent per session: a repeated report
gets the first answer again and is never counted twice.

What a report means is its kind's business (server.tasks): `check` refuses
anything the round cannot use with a 4xx that changes nothing, so the device
may retry with a good one; `prepare` does what must happen before the commit
(the train kind folds the update into a shard of the running sum,
server.partials); `record` adds it to the round inside the commit. The
answer is `accepted` (counted in the round), or `aborted` (the round has
closed, passed its deadline or already has its goal of reports: the work is
not needed).
"""
from __future__ import annotations

import logging
from typing import Any

from contract.clock import Clock
from contract.protocol.wire import Outcome
from server import sessions, telemetry
from server.errors import ErrorCode, ProtocolError
from server.registry import DeviceRegistry
from server.round import Round
from server.rounds import RoundService
from server.secagg import SecAggService
from server.store import Row, Store, Tx
from server.tasks import Contribution, TaskKind, TaskRegistry

log = logging.getLogger(__name__)


class ReportingService:
    def __init__(self, store: Store, clock: Clock, rounds: RoundService, kinds: TaskRegistry,
                 registry: DeviceRegistry, secagg: SecAggService):
        self._store, self._clock, self._rounds, self._kinds = store, clock, rounds, kinds
        self._registry, self._secagg = registry, secagg

    def _session(self, conn: Tx, device_id: str, session_id: str) -> tuple[Row, Round]:
        row = sessions.get(conn, session_id)
        if row is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id[:80]!r}")
        if row["device_id"] != device_id:
            raise ProtocolError(ErrorCode.NOT_YOUR_SESSION, "this session was assigned to another device")
        return row, self._rounds.by_id(conn, row["round_id"])

    def session(self, device_id: str, session_id: str) -> tuple[Row, Round]:
        """A session the caller may act on (404 unknown, 403 another device's), and its round."""
        return self._session(self._store.connection(), device_id, session_id)

    @staticmethod
    def _stored(session: Row, rnd: Round, task: str, model_version: int) -> Outcome | None:
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

    def report(self, device_id: str, session_id: str, task: str, report: Any) -> Outcome:
        """A session's report of kind `task` (its `model_version` must be the round's)."""
        conn = self._store.connection()
        session, rnd = self._session(conn, device_id, session_id)
        stored = self._stored(session, rnd, task, report.model_version)
        if stored is not None:
            return stored
        kind = self._kinds[task]
        open_ = self._secagg.check_upload(conn, session, rnd) if rnd.secure else True   # 409: not in this phase
        checked = kind.check(conn, session, rnd, report)                               # 4xx: nothing stored
        if not open_ or not rnd.accepts_reports(self._clock.now()):
            return self._commit(session_id, rnd.id, kind, None)
        with kind.prepare(conn, rnd, checked) as contribution:
            outcome = self._commit(session_id, rnd.id, kind, contribution)
            if contribution is not None:
                contribution.counted = outcome.counted
        return outcome

    def failure(self, device_id: str, session_id: str, reason: str) -> Outcome:
        """A device stopped its task; `reason` is a code (contract.protocol.wire.FAILURE_REASONS), never text."""
        with self._store.write() as tx:
            session, rnd = self._session(tx, device_id, session_id)
            if session["state"] == "failed":
                return Outcome("recorded", rnd.number, session["reason"])
            if session["state"] not in ("assigned", "dropped"):
                raise ProtocolError(ErrorCode.SESSION_CLOSED, f"the session is already {session['state']}")
            self._fail_session(tx, session, rnd, reason)
        self._advance(rnd.population)
        return Outcome("recorded", rnd.number, reason)

    def end_sessions_of(self, tx: Tx, device_id: str) -> None:
        """A revoked device's open sessions fail now ("revoked"), so no round waits for them."""
        for session in sessions.assigned_of_device(tx, device_id):
            rnd = self._rounds.by_id(tx, session["round_id"])
            if rnd.is_open:
                self._fail_session(tx, session, rnd, "revoked")

    def _fail_session(self, tx: Tx, session: Row, rnd: Round, reason: str) -> None:
        telemetry.failure(self._store, rnd.population, reason)
        sessions.finish(tx, session["id"], "failed", reason, self._clock.now())
        self._rounds.count(tx, rnd.id, failed=1, dropped=-int(session["state"] == "dropped"))

    def _commit(self, session_id: str, round_id: int, kind: TaskKind, contribution: Contribution | None) -> Outcome:
        """The one transaction in which a report is counted (or the session aborted)."""
        now = self._clock.now()
        with self._store.write() as tx:
            self._rounds.tick(tx, self._rounds.by_id(tx, round_id).population)
            rnd = self._rounds.by_id(tx, round_id)
            session = sessions.get(tx, session_id)
            if session["state"] == "accepted":          # a concurrent duplicate won the race
                telemetry.upload(self._store, rnd.population, rnd.task, "duplicate")
                return Outcome("accepted", rnd.number, "duplicate")
            if session["state"] not in ("assigned", "dropped"):
                return Outcome("aborted", rnd.number, session["reason"])
            closed = rnd.secure and not self._secagg.accepting(tx, rnd.id)   # the sum's set is fixed
            if contribution is None or closed or not rnd.accepts_reports(now) or session["state"] == "dropped":
                return self._abort(tx, rnd, session_id, session["state"], now)
            kind.record(tx, rnd, session_id, contribution)
            self._registry.record_participation(tx, session["device_id"], now)
            sessions.finish(tx, session_id, "accepted", None, now)
            self._rounds.count(tx, round_id, reported=1, bytes_in=contribution.nbytes)
            telemetry.upload(self._store, rnd.population, rnd.task, "accepted", contribution.nbytes)
            rnd = self._rounds.by_id(tx, round_id)
        if rnd.reported >= rnd.goal or (rnd.state == "reporting" and rnd.outstanding <= 0):
            self._advance(rnd.population)
        return Outcome("accepted", rnd.number, counted=True)

    def _abort(self, tx: Tx, rnd: Round, session_id: str, state: str, now: float) -> Outcome:
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

    def _advance(self, population: str) -> None:
        """Close the round if this report completed it; a failure here must not undo the report."""
        try:
            self._rounds.advance(population)
        except Exception:   # the ticker and the next request retry the transition
            log.exception("closing a round of %s failed; will retry", population)
