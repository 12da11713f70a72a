"""Every service of the server, built once from a config (by create_app and the CLI)."""
from __future__ import annotations

import dataclasses
import logging
import threading

from server.analytics import RoundAnalytics
from server.artifact_access import ArtifactAccess
from server.artifacts import ArtifactStore
from server.checkin import CheckinService
from contract.clock import Clock
from server.config import ServerConfig
from server.enrollment import EnrollmentService
from server.keys import Pseudonyms, operator_token, private_file, secret_key, secure_server_state
from server import populations as population_table
from server.partials import PartialSums
from server.policy import build_policy
from server.publisher import Exporter, PublishJobs, SubprocessExporter
from server.ratelimit import RateLimiter
from server.privacy import PrivacyLedger
from server.registry import DeviceRegistry
from server.reporting import ReportingService
from server.rounds import RoundService
from server.secagg import SecAggService
from server.store import Store, open_store
from server.tasks import TaskRegistry
from server.tasks.discover import DiscoverKind
from server.tasks.eval import EvalKind
from server.tasks.personalize import PersonalizeKind
from server.tasks.train import TrainKind
from server.versions import VersionRegistry

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Services:
    config: ServerConfig
    clock: Clock
    store: Store
    artifacts: ArtifactStore
    private: ArtifactStore
    partials: PartialSums
    registry: DeviceRegistry
    versions: VersionRegistry
    rounds: RoundService
    checkin: CheckinService
    reporting: ReportingService
    publisher: PublishJobs
    analytics: RoundAnalytics
    enrollment: EnrollmentService
    access: ArtifactAccess
    limits: RateLimiter
    secagg: SecAggService
    privacy: PrivacyLedger
    kinds: TaskRegistry
    operator_token: str

    def populations(self) -> list[str]:
        """Populations that are both configured and registered."""
        return [n for n in population_table.names(self.store.connection()) if n in self.config.populations]

    def tick(self) -> None:
        """Apply due round transitions of every population (what the ticker does each interval)."""
        for name in self.populations():
            self.rounds.advance(name)


def build_services(config: ServerConfig, clock: Clock | None = None,
                   exporter: Exporter | None = None) -> Services:
    secure_server_state(config)     # before anything is opened: private modes, narrowed or refused
    clock = clock or config.make_clock()
    store = open_store(config.database, fsync=config.fsync)
    limits_path = config.state_dir / "ratelimit.db"
    if store.dialect == "sqlite":              # created 0600 before SQLite creates it (and its -wal, -shm)
        private_file(limits_path)
    artifacts = ArtifactStore(config.artifact_dir, fsync=config.fsync)
    private = ArtifactStore(config.state_dir / "objects", fsync=config.fsync)
    root = config.state_dir / "partials"
    partials = PartialSums(root, config.aggregation_shards, fsync=config.fsync, locks=store.shard_locks(root),
                           first_shard=config.replica * config.aggregation_shards)
    pseudonyms = Pseudonyms(config.state_dir / "pseudonym.key")
    registry = DeviceRegistry(store, clock, pseudonyms)
    versions = VersionRegistry(store, artifacts, private, clock)
    access = ArtifactAccess(store)
    privacy = PrivacyLedger(store, registry.count)
    publisher = PublishJobs(store, artifacts, versions,
                            exporter or SubprocessExporter(config.exporter, config.publish_timeout_s),
                            clock, access, config.publish_timeout_s, privacy,
                            personalized=lambda name: name in config.populations
                            and config.population(name).personalization is not None)
    secagg = SecAggService(store, clock)
    kinds = TaskRegistry()
    rounds = RoundService(store, clock, config, kinds, secagg)
    kinds.register(
        TrainKind(store, rounds, versions, partials, secagg, privacy, rounds.settings, clock.now,
                  lambda: secret_key(config.state_dir / "dp-ftrl.key")),
        EvalKind(rounds, versions, privacy, rounds.settings, publisher.enqueue),
        PersonalizeKind(rounds, secagg),
        DiscoverKind(rounds, versions, artifacts, rounds.settings))
    policies = {name: build_policy(p.eligibility) for name, p in config.populations.items()}
    checkin = CheckinService(store, clock, rounds, kinds, versions, registry, policies, artifacts)
    reporting = ReportingService(store, clock, rounds, kinds, registry, secagg)
    enrollment = EnrollmentService(store, clock, config, registry, reporting.end_sessions_of)
    token = config.operator_token or operator_token(config.operator_token_path)
    services = Services(config, clock, store, artifacts, private, partials, registry, versions, rounds,
                        checkin, reporting, publisher, RoundAnalytics(store, pseudonyms, rounds, kinds, secagg), enrollment,
                        access, RateLimiter(limits_path, clock, store), secagg, privacy,
                        kinds, token)
    with store.read() as conn:
        open_ids, newest = rounds.open_ids(conn)
    removed = partials.collect(open_ids, newest, lambda round_id, shard: partials.committed(
        store.connection(), round_id, shard)[0])
    if removed:
        log.info("removed %d stale partial-sum files", removed)
    return services


class Ticker:
    """Background threads: round transitions every `interval_s`, and publish jobs.

    Requests already advance rounds; the ticker makes deadlines fire when no
    device is talking to the server, and runs exports (minutes long) on a
    thread of their own so a deadline is never late because of an export.
    """

    def __init__(self, services: Services, interval_s: float):
        self._services = services
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(services.tick,), daemon=True,
                                          name="nightjar-ticker"),
                         threading.Thread(target=self._loop, args=(services.publisher.run_pending,),
                                          daemon=True, name="nightjar-publisher")]

    def start(self) -> "Ticker":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, step) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                step()
            except Exception:   # a failed tick is logged and retried next interval
                log.exception("background %s failed", getattr(step, "__name__", step))
