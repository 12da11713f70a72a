"""The round lifecycle: selecting → reporting → completed | failed (and the `rounds` table's one owner).

As in Bonawitz et al. 2019 (see REFERENCES.md): a round opens when the first
eligible device checks in and selects up to `goal x over_selection` devices
within the selection window. When the selection is full, or the window ends
with at least `min_selected` devices, it stops selecting; if the window ends
with fewer, the round fails ("too_few_selected"). Reports close at `goal`, at
the deadline (window + reporting window after opening), or as soon as no
selected device can still report; the round then completes if it has
`min_reports` reports and fails otherwise ("too_few_reports"). A failed round
is retried: the next round runs the same task on the same model version with
`attempt + 1`. Reports after the close are aborted.

What a round does is its task kind's (server.tasks): which kind opens next,
what it is bound to, how it finishes and what goes when it closes. This
module asks the registry and never names a kind.

Nothing waits: `tick` applies whatever transitions the clock and the counters
call for, and is run by every check-in and report and by the background
ticker. It runs inside a write transaction, so exactly one caller closes a
round; the kind's finish runs inside that same transaction, so a crash leaves
the round open and the next tick redoes it. Anything the finish raises fails
that round alone, with its reason, after undoing what the finish had written:
a failed round is never finished again, and the population goes on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping

from contract.clock import Clock
from server import sessions, telemetry
from server.config import PopulationConfig, ServerConfig
from server.errors import ErrorCode, ProtocolError
from server.populations import Population, load_population
from server.round import Round, phases
from server.secagg import SecAggService
from server.store import Row, Store, Tx
from server.tasks import RoundFailed, RoundRefused, TaskRegistry

log = logging.getLogger(__name__)
FINISH_ERROR = "finish_error"      # a finish step raised something unexpected (logged with its traceback)
TRANSITION_ERROR = "transition_error"     # so did another transition (a secure-aggregation phase, ...)
UNAVAILABLE = "population_unavailable"    # no round could be opened (its check-ins are told so, not a 500)


class RoundService:
    COUNTERS = ("selected", "reported", "aborted", "failed", "dropped", "bytes_in", "bytes_out", "weight_sum")

    def __init__(self, store: Store, clock: Clock, config: ServerConfig, kinds: TaskRegistry,
                 secagg: SecAggService):
        self._store, self._clock, self._config = store, clock, config
        self._kinds, self._secagg = kinds, secagg

    def settings(self, population: str) -> PopulationConfig:
        if population not in self._config.populations:
            raise ProtocolError(ErrorCode.UNKNOWN_POPULATION,
                                f"population {population!r} is not served by this configuration")
        return self._config.population(population)

    # -- the rounds table: reads ----------------------------------------------------------------

    def latest(self, conn: Tx, population: str) -> Round | None:
        row = conn.execute("SELECT * FROM rounds WHERE population = ? ORDER BY number DESC LIMIT 1",
                           (population,)).fetchone()
        return Round.from_row(row) if row else None

    def by_id(self, conn: Tx, round_id: int) -> Round:
        return Round.from_row(conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone())

    def latest_of(self, conn: Tx, population: str, task: str, state: str | None = None) -> Round | None:
        row = conn.execute("SELECT * FROM rounds WHERE population = ? AND task = ? AND state = COALESCE(?, state)"
                           " ORDER BY number DESC LIMIT 1", (population, task, state)).fetchone()
        return Round.from_row(row) if row else None

    def last_completed_number(self, conn: Tx, population: str, task: str) -> int:
        return conn.execute("SELECT COALESCE(MAX(number), 0) FROM rounds WHERE population = ? AND task = ?"
                            " AND state = 'completed'", (population, task)).fetchone()[0]

    def completed_since(self, conn: Tx, population: str, task: str, after_number: int) -> int:
        return conn.execute("SELECT COUNT(*) FROM rounds WHERE population = ? AND task = ? AND state = 'completed'"
                            " AND number > ?", (population, task, after_number)).fetchone()[0]

    def recent(self, conn: Tx, population: str, task: str, limit: int) -> list[Round]:
        """The newest `limit` rounds of a task that were not refused at opening, newest first."""
        rows = conn.execute("SELECT * FROM rounds WHERE population = ? AND task = ? AND goal > 0"
                            " ORDER BY number DESC LIMIT ?", (population, task, limit)).fetchall()
        return [Round.from_row(r) for r in rows]

    def rows(self, conn: Tx, population: str, limit: int, before: int | None = None,
             task: str | None = None) -> list[Row]:
        """Round rows for analytics, newest first (`task`: only rounds with an update spec of that task)."""
        if task is not None:
            return conn.execute("SELECT * FROM rounds WHERE population = ? AND task = ? AND update_spec_json IS"
                                " NOT NULL ORDER BY number DESC LIMIT ?", (population, task, limit)).fetchall()
        return conn.execute("SELECT * FROM rounds WHERE population = ? AND number < ? ORDER BY number DESC"
                            " LIMIT ?", (population, before if before is not None else 2**62, limit)).fetchall()

    def row(self, conn: Tx, population: str, number: int) -> Row | None:
        return conn.execute("SELECT * FROM rounds WHERE population = ? AND number = ?",
                            (population, number)).fetchone()

    def last_duration(self, conn: Tx, population: str) -> float | None:
        """How long the population's last completed round took, opened to closed."""
        row = conn.execute("SELECT closed_at - opened_at FROM rounds WHERE population = ? AND state = 'completed'"
                           " ORDER BY number DESC LIMIT 1", (population,)).fetchone()
        return row[0] if row else None

    def open_ids(self, conn: Tx) -> tuple[set[int], int]:
        """The ids of every open round, and the newest round id (a snapshot for garbage collection)."""
        ids = {r["id"] for r in conn.execute("SELECT id FROM rounds WHERE state IN ('selecting', 'reporting')")}
        return ids, conn.execute("SELECT COALESCE(MAX(id), 0) FROM rounds").fetchone()[0]

    def metric_sums(self, conn: Tx, round_id: int) -> dict:
        return json.loads(conn.execute("SELECT metric_sums_json FROM rounds WHERE id = ?",
                                       (round_id,)).fetchone()[0])

    # -- the rounds table: counters ------------------------------------------------------------

    def count(self, tx: Tx, round_id: int, **deltas: float) -> None:
        """Move a round's counters (selected=1, dropped=-1, bytes_in=n, ...): the only writer of them."""
        assert set(deltas) <= set(self.COUNTERS), deltas
        tx.execute(f"UPDATE rounds SET {', '.join(f'{k} = {k} + ?' for k in deltas)} WHERE id = ?",
                   (*deltas.values(), round_id))

    def add_metrics(self, tx: Tx, round_id: int, values: Mapping[str, float], weight: float | None = None) -> None:
        """Add a report's metrics to the round's sums: weighted (sum, weight) pairs, or plain counts."""
        sums = self.metric_sums(tx, round_id)
        for name, value in values.items():
            if weight is None:
                sums[name] = sums.get(name, 0) + value
            else:
                s, w = sums.get(name, (0.0, 0.0))
                sums[name] = (s + weight * value, w + weight)
        tx.execute("UPDATE rounds SET metric_sums_json = ? WHERE id = ?", (json.dumps(sums), round_id))

    # -- transitions ----------------------------------------------------------------------------

    def advance(self, population: str) -> Round | None:
        """Apply due transitions in a transaction of its own; returns the open round, if any."""
        with self._store.write() as tx:
            return self.tick(tx, population)

    def tick(self, tx: Tx, population: str) -> Round | None:
        """Apply the open round's due transitions; a transition that raises fails that round alone."""
        rnd = self.latest(tx, population)
        if rnd is None or not rnd.is_open:
            return None
        now = self._clock.now()
        tx.execute("SAVEPOINT tick")
        try:
            result = self._transition(tx, rnd, now)
        except Exception:
            tx.execute("ROLLBACK TO SAVEPOINT tick")
            log.exception("round %s/%d: a transition failed", rnd.population, rnd.number)
            result = self._fail(tx, rnd, now, TRANSITION_ERROR)
        tx.execute("RELEASE SAVEPOINT tick")
        return result

    def _transition(self, tx: Tx, rnd: Round, now: float) -> Round | None:
        population = rnd.population
        if rnd.state == "selecting" and rnd.reported < rnd.goal and now >= rnd.selection_ends_at:
            if rnd.selected < rnd.min_selected:
                return self._fail(tx, rnd, now, "too_few_selected")
            rnd = self.close_selection(tx, rnd, now)
        if rnd.secure and rnd.state == "reporting":
            verdict = self._secagg.tick(tx, rnd, now, self.settings(population))
            if verdict == "complete":
                return self._complete(tx, rnd, now)
            return self._fail(tx, rnd, now, verdict) if verdict else rnd
        nobody_left = rnd.state == "reporting" and (now >= rnd.deadline or rnd.outstanding <= 0)
        if rnd.reported >= rnd.goal or nobody_left:
            if rnd.reported < rnd.min_reports:
                return self._fail(tx, rnd, now, "too_few_reports")
            return self._complete(tx, rnd, now)
        return rnd

    @staticmethod
    def due(rnd: Round | None, now: float) -> bool:
        """Whether `tick` would change anything (a closed or missing round needs opening)."""
        if rnd is None or not rnd.is_open or rnd.reported >= rnd.goal or (rnd.secure and rnd.state == "reporting"):
            return True
        if rnd.state == "selecting":
            return now >= rnd.selection_ends_at
        return now >= rnd.deadline or rnd.outstanding <= 0

    def open_round(self, tx: Tx, population: str) -> Round:
        """Open the next round (callers hold the write transaction and found none open). A round its kind
        refuses to open is recorded once as failed, with the reason, and returned closed."""
        cfg = self.settings(population)
        pop = load_population(tx, population)
        last = self.latest(tx, population)
        number, now = (last.number if last else 0) + 1, self._clock.now()
        tx.execute("SAVEPOINT open")
        try:
            kind = self._kinds.next_due(tx, pop, cfg)
            plan = kind.plan(tx, pop, cfg, number)
        except RoundRefused as e:
            tx.execute("RELEASE SAVEPOINT open")
            return self._refuse(tx, pop, last, e.task, number, now, e)
        except Exception as e:            # a population that cannot open rounds: say why, never a 500
            tx.execute("ROLLBACK TO SAVEPOINT open")
            tx.execute("RELEASE SAVEPOINT open")
            log.exception("population %s cannot open a round", population)
            refusal = RoundRefused(UNAVAILABLE, f"population {population!r} cannot open a round: "
                                                f"{e.__class__.__name__}")
            return self._refuse(tx, pop, last, last.task if last else refusal.task, number, now, refusal)
        tx.execute("RELEASE SAVEPOINT open")
        if plan.goal is not None:
            cfg = dataclasses.replace(cfg, goal=plan.goal)
        attempt = 1
        if last and last.state == "failed" and last.task == kind.name and last.model_version == pop.current_version:
            attempt = last.attempt + 1
        batch_size = pop.plan.batch_size if pop.plan and pop.plan.batch_size else cfg.client_batch_size
        hyper = {"learning_rate": cfg.client_lr, "epochs": cfg.client_epochs, "batch_size": batch_size,
                 "max_examples": cfg.client_max_examples}
        spec = json.dumps(plan.update.to_json()) if plan.update is not None else None
        tx.execute(
            "INSERT INTO rounds (population, number, task, model_version, attempt, state, goal,"
            " max_selected, min_selected, min_reports, hyperparameters_json, opened_at,"
            " selection_ends_at, deadline, update_spec_json)"
            " VALUES (?, ?, ?, ?, ?, 'selecting', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (population, number, kind.name, pop.current_version, attempt, cfg.goal, cfg.max_selected,
             min(cfg.min_selected, cfg.max_selected), cfg.min_reports, json.dumps(hyper), now,
             now + cfg.selection_window_s, now + cfg.selection_window_s + cfg.reporting_window_s, spec))
        rnd = self.latest(tx, population)
        telemetry.round_opened(self._store, population, number, kind.name, rnd.model_version, attempt)
        if rnd.secure:
            self._secagg.open(tx, rnd.id)
        kind.opened(tx, rnd)
        return rnd

    def _refuse(self, tx: Tx, pop: Population, last: Round | None, task: str, number: int, now: float,
                refusal: RoundRefused) -> Round:
        """The round a kind refuses: one failed round in the analytics (not one per check-in)."""
        if last and last.reason == refusal.reason and last.model_version == pop.current_version:
            return last
        log.warning("%s", refusal)
        tx.execute("INSERT INTO rounds (population, number, task, model_version, attempt, state, reason, goal,"
                   " max_selected, min_selected, min_reports, hyperparameters_json, opened_at,"
                   " selection_ends_at, deadline, closed_at, selection_closed_at)"
                   " VALUES (?, ?, ?, ?, 1, 'failed', ?, 0, 0, 0, 0, '{}', ?, ?, ?, ?, ?)",
                   (pop.name, number, task, pop.current_version, refusal.reason, now, now, now, now, now))
        self._closed_telemetry(tx, self.latest(tx, pop.name).id, "failed", refusal.reason, 0, now)
        return self.latest(tx, pop.name)

    def close_selection(self, tx: Tx, rnd: Round, now: float) -> Round:
        tx.execute("UPDATE rounds SET state = 'reporting', selection_closed_at = ? WHERE id = ?", (now, rnd.id))
        if rnd.secure:
            self._secagg.close_selection(tx, rnd.id, now, self.settings(rnd.population))
        telemetry.selection_closed(self._store, rnd.population, rnd.number, rnd.task, rnd.selected)
        return self.by_id(tx, rnd.id)

    def _close(self, tx: Tx, rnd: Round, now: float, state: str, reason: str | None,
               result_version: int | None = None, finalize_s: float | None = None) -> None:
        dropped = sessions.drop_unreported(tx, rnd.id, now)
        if rnd.secure:
            self._secagg.close(tx, rnd.id, state, reason)
        self._kinds[rnd.task].discard(tx, rnd, state == "completed")
        tx.execute("UPDATE rounds SET state = ?, reason = ?, closed_at = ?, dropped = ?,"
                   " result_version = ?, finalize_s = ?,"
                   " selection_closed_at = COALESCE(selection_closed_at, ?) WHERE id = ?",
                   (state, reason, now, dropped, result_version, finalize_s, now, rnd.id))
        self._closed_telemetry(tx, rnd.id, state, reason, dropped, now)

    def _closed_telemetry(self, tx: Tx, round_id: int, state: str, reason: str | None, dropped: int,
                          now: float) -> None:
        row = tx.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        telemetry.round_closed(self._store, row, state, reason, dropped, phases(row, now))

    def _fail(self, tx: Tx, rnd: Round, now: float, reason: str) -> None:
        log.info("round %s/%d failed: %s", rnd.population, rnd.number, reason)
        self._close(tx, rnd, now, "failed", reason)
        return None

    def _complete(self, tx: Tx, rnd: Round, now: float) -> None:
        """The kind finishes the round; whatever it raises fails this round only (see the module docstring)."""
        start = time.perf_counter()
        tx.execute("SAVEPOINT finish")
        try:
            version = self._kinds[rnd.task].finish(tx, rnd)
        except RoundFailed as e:          # the kind's own verdict: what it recorded stands
            tx.execute("RELEASE SAVEPOINT finish")
            log.warning("round %s/%d: %s", rnd.population, rnd.number, e)
            return self._fail(tx, rnd, now, e.reason)
        except Exception:                 # a bug or a sum no honest reports make: undo it, fail the round
            tx.execute("ROLLBACK TO SAVEPOINT finish")
            tx.execute("RELEASE SAVEPOINT finish")
            log.exception("round %s/%d: finishing failed", rnd.population, rnd.number)
            return self._fail(tx, rnd, now, FINISH_ERROR)
        tx.execute("RELEASE SAVEPOINT finish")
        self._close(tx, rnd, now, "completed", None, version, time.perf_counter() - start)
        log.info("round %s/%d (%s) completed%s from %d reports", rnd.population, rnd.number, rnd.task,
                 f": version {version}" if version is not None else "", rnd.reported)
        return None
