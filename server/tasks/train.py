"""The train kind: encoded updates into an exact running sum, then one server step to a new version.

Opening: the round's update spec is bound (contract.update.spec) — under DP
with the adaptive clip and the noise the ledger gives (server.privacy; a
round the budget refuses never opens), with the zeroing limit from the norms
the last completed training round accepted.

A report is the encoded update (contract.update.pipeline): `check` decodes
and checks it (a 4xx for anything the round cannot use, nothing stored);
`prepare` folds it into one shard of the round's running sum
(server.partials: lease, new generation file) and the commit moves the
shard's pointer, so it is counted exactly once or not at all.

Finishing: the shards are merged (exact integers), unmasked under secure
aggregation, decoded once into the mean update, and the server optimizer
(server.optimizers, TFF's semantics) steps from the parent version to the
new one; the DP event goes into the ledger in the same transaction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from contract.dp.ftrl import TreeNoise
from contract.secagg.masking import SecAggError
from contract.secagg.plausible import ImplausibleSum
from contract.update.pipeline import IntegerSum, UpdatePipeline, running_sum
from contract.update.robust import zeroing_norm
from server import sessions
from server.config import PopulationConfig
from server.errors import ErrorCode, ProtocolError
from server.optimizers import apply_mean_delta, build_server_optimizer, state_to_bytes
from server.partials import PartialSums
from server.populations import Population, load_population
from server.privacy import FTRL, BudgetExhausted, PrivacyLedger, participation
from server.round import Round
from server.secagg import SecAggService
from server.store import Row, Store, Tx
from server.tasks import (Contribution, KindBase, RoundFailed, RoundHistory, RoundPlan, RoundRefused,
                          bind_round_spec)
from server.versions import VersionRegistry

BUDGET_REASON = "dp_budget_exhausted"   # a training round the privacy budget refused (server.privacy)


@dataclasses.dataclass(frozen=True)
class Upload:
    """A device's upload as the view hands it over: the encoded body and its query parameters."""

    body: bytes
    model_version: int
    num_examples: int | None      # absent under secure aggregation (the weight travels masked)
    metrics: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Folded:
    """An update folded into generation `generation + 1` of `shard` (committed by `record`)."""

    shard: int
    generation: int
    weight: int
    metrics: dict
    norm: float


@dataclasses.dataclass(frozen=True)
class Zeroed:
    """An accepted update the round counts as a report but does not add (its norm was too large)."""

    norm: float
    metrics: dict


class TrainKind(KindBase):
    name = "train"

    def __init__(self, store: Store, history: RoundHistory, versions: VersionRegistry, partials: PartialSums,
                 secagg: SecAggService, privacy: PrivacyLedger, settings: Callable[[str], PopulationConfig],
                 now: Callable[[], float], noise_key: Callable[[], bytes]):
        self._store, self._history, self._versions = store, history, versions
        self._partials, self._secagg, self._privacy = partials, secagg, privacy
        self._settings, self._now, self._noise_key = settings, now, noise_key
        self._pipelines: dict[int, UpdatePipeline] = {}
        self._lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------------

    def due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> bool:
        return True                       # the fallback: a population trains unless something else is due

    def plan(self, tx: Tx, population: Population, cfg: PopulationConfig, number: int) -> RoundPlan:
        update, dp = cfg.update, None
        if cfg.dp is not None:
            try:
                bound = self._privacy.bind(tx, population.name, cfg)
            except BudgetExhausted as e:
                raise RoundRefused(BUDGET_REASON, str(e)) from None
            update = dataclasses.replace(update, clip_norm=bound.clip)
            dp = bound.bound
        limit = zeroing_norm(update.zeroing, self._last_norms(tx, population.name)) if update.zeroing else 0.0
        return RoundPlan(update=bind_round_spec(update, population, cfg, number, dp, limit))

    def _last_norms(self, conn: Tx, population: str) -> list[float]:
        """The norms of the updates the last completed training round accepted (zeroing's median)."""
        last = self._history.latest_of(conn, population, self.name, state="completed")
        return sessions.norms(conn, last.id) if last is not None else []

    def assignment(self, tx: Tx, rnd: Round, population: Population, cfg: PopulationConfig) -> dict:
        return {"layout": population.layout.to_json()}

    def admits(self, tx: Tx, rnd: Round, device_id: str) -> str | None:
        """DP-FTRL's participation rule (server.privacy): b rounds apart, at most k per horizon."""
        if rnd.update is None or rnd.update.dp_mechanism != FTRL:
            return None
        return self._privacy.admits(tx, rnd.population, device_id, self._settings(rnd.population))

    # -- one report ---------------------------------------------------------------------------

    def pipeline(self, rnd: Round) -> UpdatePipeline:
        """The round's update pipeline (built once per round and process)."""
        with self._lock:
            found = self._pipelines.get(rnd.id)
            if found is None:
                found = UpdatePipeline(rnd.update)
                self._pipelines = {k: v for k, v in self._pipelines.items() if k > rnd.id - 4}
                self._pipelines[rnd.id] = found
            return found

    def check(self, conn: Tx, session: Row, rnd: Round, report: Upload):
        """Decode and check the upload: ProtocolError (4xx) for anything the round cannot use."""
        if rnd.secure and report.num_examples is not None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "under secure aggregation the weight travels "
                                "masked inside the update: send no num_examples")
        if not rnd.secure and report.num_examples is None:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "missing query parameter 'num_examples'")
        return report, self.pipeline(rnd).accept(report.body, report.num_examples)

    @contextlib.contextmanager
    def prepare(self, conn: Tx, rnd: Round, checked) -> Iterator[Contribution | None]:
        """Fold the update into a shard of the running sum; the commit makes it count (or not)."""
        report, update = checked
        metrics = dict(report.metrics)
        if update.zeroed:      # far above what honest devices sent (contract.update.robust.zeroing_norm)
            yield Contribution(Zeroed(update.norm, metrics), len(report.body))
            return
        pipeline = self.pipeline(rnd)
        with self._partials.lease(rnd.id) as shard:
            generation, count = self._partials.committed(conn, rnd.id, shard)
            stored = self._partials.read(rnd.id, shard, generation, pipeline.stored_size(count))
            # into the new update's array, never the committed (maybe cached) one; a stack appends
            total = pipeline.fold(update.units, stored) if pipeline.linear else pipeline.fold(stored, update.units)
            try:
                self._partials.write(rnd.id, shard, generation + 1, total)
            except OSError:   # the round was closed and its directory removed meanwhile
                yield None
                return
            contribution = Contribution(Folded(shard, generation, update.weight, metrics, update.norm),
                                        len(report.body))
            try:
                yield contribution
            finally:
                if contribution.counted:
                    self._partials.remember(rnd.id, shard, generation + 1, total)
                self._partials.discard(rnd.id, shard, generation if contribution.counted else generation + 1)

    def record(self, tx: Tx, rnd: Round, session_id: str, contribution: Contribution) -> None:
        done = contribution.report
        if isinstance(done, Zeroed):
            sessions.record_report(tx, session_id, None, done.metrics, contribution.nbytes, done.norm, zeroed=True)
            return
        self._partials.commit(tx, rnd.id, done.shard, done.generation, done.weight)
        self._history.add_metrics(tx, rnd.id, done.metrics, done.weight)
        self._history.count(tx, rnd.id, weight_sum=done.weight)
        sessions.record_report(tx, session_id, int(done.weight), done.metrics, contribution.nbytes,
                               done.norm or None)                                  # masked: unknown (0)

    # -- finishing ----------------------------------------------------------------------------

    def running_sum(self, conn: Tx, rnd: Round) -> IntegerSum:
        """The round's committed shards, merged (exact integers: any order gives the same sum)."""
        pipeline = self.pipeline(rnd)
        total = running_sum(pipeline)
        for row in self._partials.committed_shards(conn, rnd.id):
            count = pipeline.stored_size(row["count"])
            shard = self._partials.read(rnd.id, row["shard"], row["generation"], count)
            total.merge(IntegerSum(count, shard.copy(), int(row["weight"]), row["count"]))
        return total

    def finish(self, tx: Tx, rnd: Round) -> int | None:
        zeroed = sessions.zeroed(tx, rnd.id)
        if rnd.reported and zeroed == rnd.reported:                # nothing to apply
            raise RoundFailed("all_updates_zeroed")
        total = self.running_sum(tx, rnd)
        if total.updates + zeroed != rnd.reported:
            raise RuntimeError(f"round {rnd.id}: {total.updates} updates in the running sum and {zeroed} "
                               f"zeroed, {rnd.reported} accepted")
        mean_delta, unclipped, weight_sum, survivors = self._mean(tx, rnd, total)
        cfg = self._settings(rnd.population)
        parent = self._versions.get(rnd.population, rnd.model_version, tx)
        optimizer = build_server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)
        fresh = optimizer.initialize(len(mean_delta))
        state = self._versions.optimizer_state(parent)
        if state is None or set(state) != set(fresh):   # first round, or the optimizer was changed
            state = fresh
        state, weights, applied = apply_mean_delta(optimizer, state, self._versions.weights(parent), mean_delta)
        if not applied:
            self._record_dp(tx, rnd, None, survivors, unclipped)
            raise RoundFailed("non_finite_aggregate")
        train = {name: s / w for name, (s, w) in self._history.metric_sums(tx, rnd.id).items() if w > 0}
        train.update(reports=rnd.reported, zeroed=zeroed, examples=weight_sum,
                     mean_delta_norm=float(np.linalg.norm(mean_delta)), optimizer=optimizer.name,
                     update_bits=rnd.update.spec.bits, secure_aggregation=rnd.secure)
        train.update(optimizer.published(), **{k: v for k, v in rnd.update.to_json().items() if k.startswith("dp_")})
        if self.pipeline(rnd).dp:
            train.update(dp_clip=rnd.update.spec.clip_norm, dp_unclipped=unclipped)
        population = load_population(tx, rnd.population)
        version = self._versions.add(tx, rnd.population, population.layout, population.model_config,
                                     rnd.model_version, rnd.number, weights, state_to_bytes(optimizer, state), train)
        self._record_dp(tx, rnd, version.version, survivors, unclipped)
        return version.version

    def _mean(self, tx: Tx, rnd: Round, total: IntegerSum) -> tuple[np.ndarray, int, int, int]:
        """The decoded mean update, the unclipped count (DP), Σ weights and the number of reports summed."""
        pipeline = self.pipeline(rnd)
        noise = self._noise(tx, rnd)
        if not rnd.secure:
            mean_delta, unclipped = pipeline.finalize_with_count(total.total, total.weight, noise)
            return mean_delta, unclipped, int(total.weight), total.updates
        try:
            plain, survivors = self._secagg.unmask(tx, rnd, total.total)
        except SecAggError as e:          # a secret that cannot be rebuilt and checked: publish nothing
            raise RoundFailed("unmask_failed", str(e)) from None
        ring = pipeline.ring.reduce(plain.astype(np.int64))
        try:                              # a sum no honest phones could send (contract.secagg.plausible)
            mean_delta, unclipped = pipeline.finalize_masked_with_count(ring, survivors, noise)
        except ImplausibleSum as e:
            raise RoundFailed("implausible_sum", str(e)) from None
        return mean_delta, unclipped, int(ring[pipeline.count]), survivors

    def _noise(self, tx: Tx, rnd: Round):
        """DP-FTRL: the round's share of the tree's noise, regenerated from the key and its release index
        (None: the pipeline draws central noise, if any, from the OS CSPRNG)."""
        if rnd.update is None or rnd.update.dp_mechanism != FTRL:
            return None
        layout = participation(self._settings(rnd.population))
        tree = TreeNoise(self._noise_key(), layout.horizon, layout.restart_every, label=rnd.population)
        return tree.source(self._privacy.released(tx, rnd.population))

    def _record_dp(self, tx: Tx, rnd: Round, version: int | None, reports: int, unclipped: float) -> None:
        if rnd.update is not None and rnd.update.dp_mechanism:
            self._privacy.record(tx, rnd.population, rnd.id, rnd.number, version, rnd.update, reports, unclipped,
                                 self._settings(rnd.population), self._now(), sessions.accepted_devices(tx, rnd.id))

    def discard(self, tx: Tx, rnd: Round, completed: bool) -> None:
        """The round's shard pointers go with its close; its files once that is committed."""
        self._partials.drop(tx, rnd.id)
        self._store.on_commit(lambda: self._partials.remove_round(rnd.id))
