"""The round lifecycle: selecting → reporting → completed | failed.

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

Nothing waits: `tick` applies whatever transitions the clock and the counters
call for, and is run by every check-in and report and by the background
ticker. It runs inside a write transaction, so exactly one caller closes a
round; completing a training round (reading the shards of the running sum,
the server optimizer step, the new version) happens inside that same
transaction, so a crash leaves the round open and the next tick redoes it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time

import numpy as np

from contract.update.pipeline import IntegerSum, UpdatePipeline, running_sum
from contract.update.robust import zeroing_norm
from contract.secagg.masking import SecAggError
from contract.update.spec import RoundSpec, rotation_seed
from server import sessions, telemetry
from server.analytics import phases
from contract.clock import Clock
from server.config import PopulationConfig, ServerConfig
from server.errors import ErrorCode, ProtocolError
from server.optimizers import apply_mean_delta, build_server_optimizer, state_to_bytes
from server.partials import PartialSums
from server.privacy import BudgetExhausted, PrivacyLedger
from server.populations import Population, load_population
from server.artifacts import ArtifactStore
from server.discovery import DiscoveryService
from server.personal_eval import PersonalEvaluations
from server.secagg import SecAggService
from server.store import Store
from server.versions import VersionRegistry
from server.vocabulary import grow

log = logging.getLogger(__name__)
BUDGET_REASON = "dp_budget_exhausted"   # a training round the privacy budget refused (server.privacy)
OPEN_STATES = ("selecting", "reporting")


@dataclasses.dataclass(frozen=True)
class Round:
    id: int
    population: str
    number: int
    task: str
    model_version: int
    attempt: int
    state: str
    goal: int
    max_selected: int
    min_selected: int
    min_reports: int
    hyperparameters: dict
    opened_at: float
    selection_ends_at: float
    deadline: float
    closed_at: float | None
    selected: int
    reported: int
    aborted: int
    failed: int
    update: RoundSpec | None    # training rounds: how their updates are encoded
    reason: str | None = None   # why it failed (None while open or once completed)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Round":
        names = {f.name for f in dataclasses.fields(cls)} - {"hyperparameters", "update"}
        spec = row["update_spec_json"]
        return cls(hyperparameters=json.loads(row["hyperparameters_json"]),
                   update=RoundSpec.from_json(json.loads(spec)) if spec else None,
                   **{n: row[n] for n in names})

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def secure(self) -> bool:
        """Its updates are masked (server.secagg): the server sees only their sum."""
        return self.update is not None and self.update.spec.secure_aggregation

    @property
    def outstanding(self) -> int:
        """Selected devices that may still report."""
        return self.selected - self.reported - self.failed - self.aborted

    def accepts_reports(self, now: float) -> bool:
        return self.is_open and now < self.deadline and self.reported < self.goal


class RoundService:
    def __init__(self, store: Store, clock: Clock, config: ServerConfig, versions: VersionRegistry,
                 partials: PartialSums, secagg: SecAggService, discovery: DiscoveryService,
                 artifacts: ArtifactStore, privacy: PrivacyLedger, on_publish=None, personal=None):
        self._store = store
        self._personal = personal or PersonalEvaluations()
        self._privacy = privacy
        self._secagg = secagg
        self._discovery = discovery
        self._artifacts = artifacts
        self._clock = clock
        self._config = config
        self._versions = versions
        self._partials = partials
        self._on_publish = on_publish or (lambda tx, population, version: None)
        self._closed = threading.local()   # ids of rounds closed by this thread, for cleanup()
        self._pipelines: dict[int, UpdatePipeline] = {}
        self._pipelines_lock = threading.Lock()

    def settings(self, population: str) -> PopulationConfig:
        if population not in self._config.populations:
            raise ProtocolError(ErrorCode.UNKNOWN_POPULATION,
                                f"population {population!r} is not served by this configuration")
        return self._config.population(population)

    @staticmethod
    def _last_norms(conn: sqlite3.Connection, population: str) -> list[float]:
        """The norms of the updates that the last completed training round accepted (zeroing's median)."""
        return [r[0] for r in conn.execute(
            "SELECT s.norm FROM sessions s WHERE s.state = 'accepted' AND s.norm IS NOT NULL AND s.round_id ="
            " (SELECT MAX(id) FROM rounds WHERE population = ? AND task = 'train' AND state = 'completed')",
            (population,))]

    def latest(self, conn: sqlite3.Connection, population: str) -> Round | None:
        row = conn.execute("SELECT * FROM rounds WHERE population = ? ORDER BY number DESC LIMIT 1",
                           (population,)).fetchone()
        return Round.from_row(row) if row else None

    def by_id(self, conn: sqlite3.Connection, round_id: int) -> Round:
        return Round.from_row(conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone())

    COUNTERS = ("selected", "reported", "aborted", "failed", "dropped", "bytes_in", "bytes_out", "weight_sum")

    @classmethod
    def count(cls, tx: sqlite3.Connection, round_id: int, **deltas: float) -> None:
        """Move a round's counters (selected=1, dropped=-1, bytes_in=n, ...): the only writer of them."""
        assert set(deltas) <= set(cls.COUNTERS), deltas
        tx.execute(f"UPDATE rounds SET {', '.join(f'{k} = {k} + ?' for k in deltas)} WHERE id = ?",
                   (*deltas.values(), round_id))

    @staticmethod
    def add_metrics(tx: sqlite3.Connection, round_id: int, values: dict, weight: float | None = None) -> None:
        """Add a report's metrics to the round's sums: weighted (sum, weight) pairs, or plain counts."""
        sums = json.loads(tx.execute("SELECT metric_sums_json FROM rounds WHERE id = ?", (round_id,)).fetchone()[0])
        for name, value in values.items():
            if weight is None:
                sums[name] = sums.get(name, 0) + value
            else:
                s, w = sums.get(name, (0.0, 0.0))
                sums[name] = (s + weight * value, w + weight)
        tx.execute("UPDATE rounds SET metric_sums_json = ? WHERE id = ?", (json.dumps(sums), round_id))

    def advance(self, population: str) -> Round | None:
        """Apply due transitions in a transaction of its own; returns the open round, if any."""
        with self._store.write() as tx:
            current = self.tick(tx, population)
        self.cleanup()
        return current

    def tick(self, tx: sqlite3.Connection, population: str) -> Round | None:
        rnd = self.latest(tx, population)
        if rnd is None or not rnd.is_open:
            return None
        now = self._clock.now()
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

    def open_round(self, tx: sqlite3.Connection, population: str) -> Round:
        """Open the next round (callers hold the write transaction and found none open)."""
        cfg = self.settings(population)
        pop = load_population(tx, population)
        last = self.latest(tx, population)
        if cfg.eval_every and pop.train_since_eval >= cfg.eval_every:
            task = "eval"
        elif self._personal.due(tx, population, cfg.personal_eval_every):
            task = "personalize"
        elif self._discovery.due(tx, population, cfg.discovery):
            task = "discover"
            if cfg.discovery.goal:                    # votes are cheap: discover rounds may hear from more
                cfg = dataclasses.replace(cfg, goal=cfg.discovery.goal)
        else:
            task = "train"
        attempt = 1
        if (last and last.state == "failed" and last.task == task
                and last.model_version == pop.current_version):
            attempt = last.attempt + 1
        now = self._clock.now()
        batch_size = pop.plan.batch_size if pop.plan and pop.plan.batch_size else cfg.client_batch_size
        hyper = {"learning_rate": cfg.client_lr, "epochs": cfg.client_epochs, "batch_size": batch_size,
                 "max_examples": cfg.client_max_examples}
        number = (last.number if last else 0) + 1
        spec = None

        def bind(update, dp=None, limit: float = 0.0) -> str:
            return json.dumps(update.bind(pop.layout.size, pop.layout.sha256, f"{population}/{number}",
                                          rotation_seed(cfg.seed, number), cfg.max_selected, dp, limit).to_json())
        if task == "personalize" and cfg.update.secure_aggregation:   # its counts travel masked too
            spec = bind(cfg.update)
        if task == "train":
            update, dp = cfg.update, None
            if cfg.dp is not None:
                try:
                    bound = self._privacy.bind(tx, population, cfg)
                except BudgetExhausted as e:
                    return self._refuse_budget(tx, population, last, pop, number, now, e)
                update = dataclasses.replace(update, clip_norm=bound.clip)
                dp = bound.bound
            limit = zeroing_norm(update.zeroing, self._last_norms(tx, population)) if update.zeroing else 0.0
            spec = bind(update, dp, limit)
        tx.execute(
            "INSERT INTO rounds (population, number, task, model_version, attempt, state, goal,"
            " max_selected, min_selected, min_reports, hyperparameters_json, opened_at,"
            " selection_ends_at, deadline, update_spec_json)"
            " VALUES (?, ?, ?, ?, ?, 'selecting', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (population, number, task, pop.current_version, attempt, cfg.goal, cfg.max_selected,
             min(cfg.min_selected, cfg.max_selected), cfg.min_reports, json.dumps(hyper), now,
             now + cfg.selection_window_s, now + cfg.selection_window_s + cfg.reporting_window_s, spec))
        rnd = self.latest(tx, population)
        telemetry.round_opened(self._store, population, number, task, rnd.model_version, attempt)
        if rnd.secure:
            self._secagg.open(tx, rnd.id)
        if task == "discover":
            self._discovery.open(tx, population)
        return rnd

    def _refuse_budget(self, tx: sqlite3.Connection, population: str, last: Round | None, pop: Population,
                       number: int, now: float, refusal: BudgetExhausted) -> Round:
        """The training round the budget refuses: one failed round in the analytics (not one per check-in)."""
        if last and last.reason == BUDGET_REASON and last.model_version == pop.current_version:
            return last
        log.warning("%s", refusal)
        tx.execute("INSERT INTO rounds (population, number, task, model_version, attempt, state, reason, goal,"
                   " max_selected, min_selected, min_reports, hyperparameters_json, opened_at,"
                   " selection_ends_at, deadline, closed_at, selection_closed_at)"
                   " VALUES (?, ?, 'train', ?, 1, 'failed', ?, 0, 0, 0, 0, '{}', ?, ?, ?, ?, ?)",
                   (population, number, pop.current_version, BUDGET_REASON, now, now, now, now, now))
        self._closed_telemetry(tx, self.latest(tx, population).id, "failed", BUDGET_REASON, 0, now)
        return self.latest(tx, population)

    def discovery_ask(self, conn: sqlite3.Connection, rnd: Round):
        """What a discover round's devices vote on (None for other tasks)."""
        if rnd.task != "discover":
            return None
        return self._discovery.ask(conn, rnd.population, self.settings(rnd.population).discovery)

    def pipeline(self, rnd: Round) -> UpdatePipeline:
        """The update pipeline of a training round (built once per round and process)."""
        with self._pipelines_lock:
            found = self._pipelines.get(rnd.id)
            if found is None:
                found = UpdatePipeline(rnd.update)
                self._pipelines = {k: v for k, v in self._pipelines.items() if k > rnd.id - 4}
                self._pipelines[rnd.id] = found
            return found

    def close_selection(self, tx: sqlite3.Connection, rnd: Round, now: float) -> Round:
        tx.execute("UPDATE rounds SET state = 'reporting', selection_closed_at = ? WHERE id = ?",
                   (now, rnd.id))
        if rnd.secure:
            self._secagg.close_selection(tx, rnd.id, now, self.settings(rnd.population))
        telemetry.selection_closed(self._store, rnd.population, rnd.number, rnd.task, rnd.selected)
        return self.by_id(tx, rnd.id)

    def cleanup(self) -> None:
        """Delete the running-sum files of rounds this thread closed, once that is committed."""
        pending, self._closed.ids = getattr(self._closed, "ids", set()), set()
        conn = self._store.connection()
        for round_id in pending:
            row = conn.execute("SELECT state FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if row is not None and row["state"] not in OPEN_STATES:
                self._partials.remove_round(round_id)

    def collect_garbage(self) -> int:
        """Remove every partial-sum file no open round refers to (startup after a crash)."""
        with self._store.read() as conn:
            open_ids = {r["id"] for r in conn.execute(
                "SELECT id FROM rounds WHERE state IN ('selecting', 'reporting')")}
            newest = conn.execute("SELECT COALESCE(MAX(id), 0) FROM rounds").fetchone()[0]

        def committed(round_id: int, shard: int) -> int:
            row = self._store.connection().execute(
                "SELECT generation FROM partials WHERE round_id = ? AND shard = ?",
                (round_id, shard)).fetchone()
            return row["generation"] if row else 0

        return self._partials.collect(open_ids, newest, committed)

    def _close(self, tx: sqlite3.Connection, rnd: Round, now: float, state: str, reason: str | None,
               result_version: int | None = None, finalize_s: float | None = None) -> None:
        self._closed.ids = getattr(self._closed, "ids", set()) | {rnd.id}
        dropped = sessions.drop_unreported(tx, rnd.id, now)
        self._partials.drop(tx, rnd.id)                                    # its files go after COMMIT
        if rnd.secure:
            self._secagg.close(tx, rnd.id, state, reason)
        if rnd.task == "discover":
            self._discovery.discard(tx, rnd.id)
        if rnd.task == "personalize" and state == "failed":
            self._personal.discard(tx, rnd.id)
        tx.execute("UPDATE rounds SET state = ?, reason = ?, closed_at = ?, dropped = ?,"
                   " result_version = ?, finalize_s = ?,"
                   " selection_closed_at = COALESCE(selection_closed_at, ?) WHERE id = ?",
                   (state, reason, now, dropped, result_version, finalize_s, now, rnd.id))
        self._closed_telemetry(tx, rnd.id, state, reason, dropped, now)

    def _closed_telemetry(self, tx: sqlite3.Connection, round_id: int, state: str, reason: str | None,
                          dropped: int, now: float) -> None:
        row = tx.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        telemetry.round_closed(self._store, row, state, reason, dropped, phases(row, now))

    def _fail(self, tx: sqlite3.Connection, rnd: Round, now: float, reason: str) -> None:
        log.info("round %s/%d failed: %s", rnd.population, rnd.number, reason)
        self._close(tx, rnd, now, "failed", reason)
        return None

    def _complete(self, tx: sqlite3.Connection, rnd: Round, now: float) -> None:
        start = time.perf_counter()
        pop = load_population(tx, rnd.population)
        cfg = self.settings(rnd.population)
        if rnd.task == "eval":
            self._finish_eval(tx, rnd, pop, cfg)
            self._close(tx, rnd, now, "completed", None, None, time.perf_counter() - start)
            return None
        if rnd.task == "personalize":      # its sum is already stored (server.personal_eval)
            if rnd.secure:
                reason = self._unmask_personal(tx, rnd)
                if reason:
                    return self._fail(tx, rnd, now, reason)
            self._close(tx, rnd, now, "completed", None, None, time.perf_counter() - start)
            return None
        if rnd.task == "discover":
            words = self._discovery.close_level(tx, rnd, cfg.discovery)
            version = grow(tx, self._artifacts, self._versions, pop, rnd.number, words) if words else None
            self._close(tx, rnd, now, "completed", None, version, time.perf_counter() - start)
            if words:
                log.info("round %s/%d: discovery found %d new words -> version %s", rnd.population,
                         rnd.number, len(words), version)
            return None
        if rnd.reported and self.zeroed(tx, rnd) == rnd.reported:     # nothing to apply
            return self._fail(tx, rnd, now, "all_updates_zeroed")
        try:
            version = self._finish_train(tx, rnd, pop, cfg)
        except SecAggError as e:          # a secret that cannot be rebuilt and checked: publish nothing
            log.error("round %s/%d: unmasking failed: %s", rnd.population, rnd.number, e)
            return self._fail(tx, rnd, now, "unmask_failed")
        if version is None:
            return self._fail(tx, rnd, now, "non_finite_aggregate")
        self._close(tx, rnd, now, "completed", None, version, time.perf_counter() - start)
        log.info("round %s/%d completed: version %d from %d reports", rnd.population, rnd.number,
                 version, rnd.reported)
        return None

    @staticmethod
    def zeroed(conn: sqlite3.Connection, rnd: Round) -> int:
        """Reports of the round that were counted but not added (contract.update.robust.zeroing_norm)."""
        return conn.execute("SELECT COUNT(*) FROM sessions WHERE round_id = ? AND state = 'accepted'"
                            " AND reason = 'zeroed'", (rnd.id,)).fetchone()[0]

    def _unmask_personal(self, tx: sqlite3.Connection, rnd: Round) -> str | None:
        """A secure personalize round's sum, unmasked and checked in place; a failure reason if not."""
        masked = self._personal.masked_sum(tx, rnd.id)
        if masked is None:
            return "too_few_reports"
        try:
            plain, survivors = self._secagg.unmask(tx, rnd, masked)
            self._personal.unmasked(tx, rnd.id, plain, survivors)
        except SecAggError as e:
            log.error("round %s/%d: unmasking failed: %s", rnd.population, rnd.number, e)
            return "unmask_failed"
        except ValueError as e:           # the sum of honest reports is always consistent
            log.error("round %s/%d: the unmasked sum is not one of reports: %s", rnd.population, rnd.number, e)
            return "implausible_sum"
        return None

    def running_sum(self, tx: sqlite3.Connection, rnd: Round) -> IntegerSum:
        """The round's committed shards, merged (exact integers: any order gives the same sum)."""
        pipeline = self.pipeline(rnd)
        total = running_sum(pipeline)
        for row in tx.execute("SELECT shard, generation, weight, count FROM partials WHERE round_id = ?"
                              " ORDER BY shard", (rnd.id,)).fetchall():
            count = pipeline.stored_size(row["count"])
            shard = self._partials.read(rnd.id, row["shard"], row["generation"], count)
            total.merge(IntegerSum(count, shard.copy(), int(row["weight"]), row["count"]))
        return total

    def _finish_train(self, tx: sqlite3.Connection, rnd: Round, pop: Population,
                      cfg: PopulationConfig) -> int | None:
        size = pop.layout.size
        total = self.running_sum(tx, rnd)
        zeroed = self.zeroed(tx, rnd)
        if total.updates + zeroed != rnd.reported:
            raise RuntimeError(f"round {rnd.id}: {total.updates} updates in the running sum and {zeroed} "
                               f"zeroed, {rnd.reported} accepted")
        pipeline = self.pipeline(rnd)
        if rnd.secure:
            plain, survivors = self._secagg.unmask(tx, rnd, total.total)
            ring = pipeline.ring.reduce(plain.astype(np.int64))
            weight_sum = int(ring[pipeline.count])
            mean_delta, unclipped = pipeline.finalize_masked_with_count(ring, survivors)
        else:
            weight_sum, survivors = int(total.weight), total.updates
            mean_delta, unclipped = pipeline.finalize_with_count(total.total, total.weight)
        parent = self._versions.get(rnd.population, rnd.model_version, tx)
        optimizer = build_server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)
        fresh = optimizer.initialize(size)
        state = self._versions.optimizer_state(parent)
        if state is None or set(state) != set(fresh):   # first round, or the optimizer was changed
            state = fresh
        state, weights, applied = apply_mean_delta(optimizer, state, self._versions.weights(parent),
                                                   mean_delta)
        if not applied:
            self._record_dp(tx, rnd, None, survivors, unclipped, cfg)
            return None
        row = tx.execute("SELECT weight_sum, metric_sums_json FROM rounds WHERE id = ?",
                         (rnd.id,)).fetchone()
        train = {name: s / w for name, (s, w) in json.loads(row["metric_sums_json"]).items() if w > 0}
        train.update(reports=rnd.reported, zeroed=zeroed, examples=weight_sum,
                     mean_delta_norm=float(np.linalg.norm(mean_delta)), optimizer=optimizer.name,
                     update_bits=rnd.update.spec.bits, secure_aggregation=rnd.secure)
        if pipeline.dp:
            train.update(dp_clip=rnd.update.spec.clip_norm, dp_unclipped=unclipped)
        version = self._versions.add(tx, rnd.population, pop.layout, pop.model_config, rnd.model_version,
                                     rnd.number, weights, state_to_bytes(optimizer, state), train)
        self._record_dp(tx, rnd, version.version, survivors, unclipped, cfg)
        self._discovery.count_training(tx, rnd.population)
        return version.version

    def _record_dp(self, tx: sqlite3.Connection, rnd: Round, version: int | None, reports: int,
                   unclipped: float, cfg: PopulationConfig) -> None:
        if rnd.update is not None and rnd.update.dp_mechanism:
            self._privacy.record(tx, rnd.population, rnd.id, rnd.number, version, rnd.update,
                                 reports, unclipped, cfg, self._clock.now())

    def _finish_eval(self, tx: sqlite3.Connection, rnd: Round, pop: Population,
                     cfg: PopulationConfig) -> None:
        sums = json.loads(tx.execute("SELECT metric_sums_json FROM rounds WHERE id = ?",
                                     (rnd.id,)).fetchone()[0])
        positions = int(sums.get("positions", 0))
        result = {"round": rnd.number, "reports": rnd.reported, "positions": positions,
                  "top1_hits": int(sums.get("top1_hits", 0)), "top3_hits": int(sums.get("top3_hits", 0))}
        result["top1"] = result["top1_hits"] / max(positions, 1)
        result["top3"] = result["top3_hits"] / max(positions, 1)
        if "loss_sum" in sums:
            result["loss"] = sums["loss_sum"] / max(positions, 1)
        if (self._versions.record_eval(tx, rnd.population, rnd.model_version, result, cfg.publish_every)
                and self._privacy.publishable(tx, rnd.population, rnd.model_version, cfg)):
            self._on_publish(tx, rnd.population, rnd.model_version)
