"""Check-in: eligibility, selection into the open round, and pace steering.

A device says what state it is in; the answer is either an assignment (a new
session in the population's open round, or the same one again if the device
asks twice) or a rejection with a retry window `[min, max]` seconds from which
the device picks its next check-in uniformly at random.

Pace steering (Bonawitz et al. 2019, sec. 2.3): the server wants about
`2 x max_selected` check-ins per selection window (half of a population is
typically ineligible at any time), so with D registered devices it spreads
their returns over `D x window / (2 x max_selected)` seconds (at least one
window, at most `max_retry_s`): a large population is thinned out, a small one
is gathered within one window. The window starts when the current round is
expected to end: at the deadline, or earlier if the previous round of the
population finished faster. Ineligible devices come back after 15 min +- 20%
(federated-compute's transient-error window), or when their minimum
separation between participations has passed.
"""
from __future__ import annotations

import secrets
import threading
import time

from contract.model.batching import round_seed
from contract.tasks import failure_path, report_path
from contract.protocol.wire import Assignment, Conditions, Rejection
from server.artifacts import ArtifactStore
from server import sessions, telemetry
from contract.clock import Clock
from server.config import PopulationConfig
from server.policy import Context, EligibilityPolicy
from server.populations import Population, load_population
from server.registry import Device, DeviceRegistry
from server.round import Round
from server.rounds import RoundService
from server.store import Store, Tx
from server.tasks import TaskRegistry
from server.versions import VersionRegistry

DEVICE_COUNT_TTL_S = 10.0


def artifact_url(sha256: str) -> str:
    return f"/v1/artifacts/{sha256}"


def artifact_ref(sha256: str) -> dict:
    """The wire's {url, sha256} of a stored artifact."""
    return {"url": artifact_url(sha256), "sha256": sha256}


def make_assignment(session_id: str, seed: int, rnd: Round, pop: Population, checkpoint_sha256: str,
                    now: float, extra: dict) -> Assignment:
    """The wire assignment of a session (contract.protocol.wire.Assignment); `extra`: what its kind adds
    (server.tasks: the layout of a train task, a discover task's level, a personalize task's spec)."""
    plan = None
    if pop.plan is not None:
        plan = {**artifact_ref(pop.plan.artifact_sha256), "manifest": artifact_ref(pop.plan.manifest_sha256)}
    return Assignment(
        session_id=session_id, task=rnd.task, population=pop.name, round=rnd.number,
        model_version=rnd.model_version, plan=plan, checkpoint=artifact_ref(checkpoint_sha256),
        vocab=artifact_ref(pop.vocab_sha256) if pop.vocab_sha256 else None,
        hyperparameters={**rnd.hyperparameters, "seed": seed},
        report_deadline=rnd.deadline, report_deadline_in_s=max(0.0, rnd.deadline - now),
        report_url=report_path(rnd.task, session_id), failure_url=failure_path(session_id),
        update=rnd.update, **extra)


class CheckinService:
    def __init__(self, store: Store, clock: Clock, rounds: RoundService, kinds: TaskRegistry,
                 versions: VersionRegistry, registry: DeviceRegistry, policies: dict[str, EligibilityPolicy],
                 artifacts: ArtifactStore):
        self._store = store
        self._kinds = kinds
        self._clock = clock
        self._rounds = rounds
        self._versions = versions
        self._registry = registry
        self._policies = policies
        self._artifacts = artifacts
        self._sizes: dict[str, int] = {}
        self._device_count = (0.0, 0)
        self._lock = threading.Lock()

    def checkin(self, device: Device, population: str,
                conditions: Conditions) -> Assignment | Rejection:
        cfg = self._rounds.settings(population)                      # NotFound if not configured
        load_population(self._store.connection(), population)        # ... or not registered
        policy = self._policies[population]
        ctx = Context(self._clock.now(), device.last_participation_at)
        failed = policy.failures(conditions, ctx)
        if failed:
            low, high = cfg.ineligible_retry_s
            wait = policy.wait_s(ctx)
            telemetry.checkin(self._store, population, "ineligible")
            return Rejection("ineligible", max(low, wait), max(high, wait + high - low), tuple(failed))
        with self._store.read() as conn:   # most check-ins meet a full round: no write lock for those
            rnd = self._rounds.latest(conn, population)
            full = not self._rounds.due(rnd, ctx.now) and (rnd.state != "selecting"
                                                            or rnd.selected >= rnd.max_selected)
            if full and sessions.of_device(conn, rnd.id, device.id) is None:
                telemetry.checkin(self._store, population, "round_full")
                return self._busy(conn, rnd, cfg, "round_full")
        with self._store.write() as tx:
            return self._select(tx, device, population, cfg)

    def _select(self, tx: Tx, device: Device, population: str,
                cfg: PopulationConfig) -> Assignment | Rejection:
        rnd = self._rounds.tick(tx, population) or self._rounds.open_round(tx, population)
        pop = load_population(tx, population)
        kind = self._kinds[rnd.task]
        mine = sessions.of_device(tx, rnd.id, device.id)
        if mine is not None:
            if mine["state"] == "assigned" and rnd.accepts_reports(self._clock.now()):
                telemetry.checkin(self._store, population, "resumed")
                version = self._versions.get(pop.name, rnd.model_version, tx)
                return make_assignment(mine["id"], mine["seed"], rnd, pop, version.checkpoint_sha256,
                                       self._clock.now(), kind.assignment(tx, rnd, pop, cfg))
            telemetry.checkin(self._store, population, "already_participated")
            return self._busy(tx, rnd, cfg, "already_participated")
        if not rnd.is_open:            # a round its kind refused to open (the privacy budget): until it may
            telemetry.checkin(self._store, population, rnd.reason)
            return Rejection(rnd.reason, cfg.max_retry_s / 2, cfg.max_retry_s)
        if rnd.state != "selecting" or rnd.selected >= rnd.max_selected:
            telemetry.checkin(self._store, population, "round_full")
            return self._busy(tx, rnd, cfg, "round_full")
        refusal = kind.admits(tx, rnd, device.id)        # a participation rule of the kind
        if refusal is not None:
            telemetry.checkin(self._store, population, refusal)
            return self._busy(tx, rnd, cfg, refusal)
        session_id = "s-" + secrets.token_hex(16)
        seed = round_seed(cfg.seed, rnd.number, rnd.selected)
        version = self._versions.get(population, rnd.model_version, tx)
        bytes_out = self._artifact_bytes(version.checkpoint_sha256, pop)
        now = self._clock.now()
        sessions.assign(tx, session_id, rnd.id, device.id, seed, now, bytes_out, population,
                        version.checkpoint_sha256)
        self._rounds.count(tx, rnd.id, selected=1, bytes_out=bytes_out)
        telemetry.selected(self._store, population, bytes_out)
        rnd = self._rounds.by_id(tx, rnd.id)
        if rnd.selected >= rnd.max_selected:
            rnd = self._rounds.close_selection(tx, rnd, now)
        return make_assignment(session_id, seed, rnd, pop, version.checkpoint_sha256, now,
                               kind.assignment(tx, rnd, pop, cfg))

    def _busy(self, tx: Tx, rnd: Round, cfg: PopulationConfig, reason: str) -> Rejection:
        """A retry window that spreads the population over the next selection window(s)."""
        now = self._clock.now()
        window = cfg.selection_window_s
        spread = self.device_count() * window / (2 * cfg.max_selected)
        spread = min(max(spread, window), cfg.max_retry_s)
        last = self._rounds.last_duration(tx, rnd.population)
        expected_end = rnd.deadline if last is None else min(rnd.deadline, rnd.opened_at + last)
        start = max(0.0, expected_end - now)
        return Rejection(reason, start, start + spread)

    def device_count(self) -> int:
        with self._lock:
            at, count = self._device_count
            if time.monotonic() - at < DEVICE_COUNT_TTL_S and count:
                return count
        count = self._registry.count()
        with self._lock:
            self._device_count = (time.monotonic(), count)
        return count

    def _artifact_bytes(self, checkpoint_sha256: str, pop: Population) -> int:
        """Bytes the configuration phase sends one device: the checkpoint (and plan, if any)."""
        total = 0
        for sha in [checkpoint_sha256] + ([pop.plan.artifact_sha256] if pop.plan else []):
            if sha not in self._sizes:
                self._sizes[sha] = self._artifacts.path(sha).stat().st_size
            total += self._sizes[sha]
        return total
