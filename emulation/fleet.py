"""The emulated phone fleet: N real device runtimes against a real server, in simulated time.

Each phone is a `device_runtime.runtime.Device` (the same code a real phone runs) with
its own data directory, example store (one training client's speeches from
the corpus: what its user typed), identity and participation log, and
`ScheduledConditions` that follow its owner's day (see emulation.world). Phones
run concurrently on a pool of worker threads against the server over HTTP:
a worker wakes the phone that is due next, lets it do one pass of its loop
(`Device.step`: check the policy, check in, train, upload) and puts it back
to sleep for as long as the runtime asked. What lets one host emulate
10,000 phones:

* while its owner's day rules training out, a phone is not woken at all
  until the day changes something (as a phone's job scheduler holds a job
  whose constraints are unmet) — most phones sleep most of the time;
* for large fleets (`persistent=False`) a phone's runtime exists in memory
  only while it is awake: its state is on disk, as on a phone whose keyboard
  process was killed in between;
* LiteRT interpreters are lent by a `PlanPool` to the few phones training at
  any moment, and the phones share one HTTP connection pool and one
  content-addressed artifact cache (emulation.phones).

Time is simulated: the server and the phones share a start and a speed (the
server config's `clock_start`, `clock_speed`, `clock_epoch`), so deadlines,
retry windows and time zones mean the same on both sides while a night
passes in minutes.

    python -m emulation fleet --server URL --server-config server.toml --data DIR \
        --phones 200 --rounds 20 [--unplug-fraction 0.3 --upload-failure-fraction 0.1 ...]
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import heapq
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from device_runtime.client import ArtifactCache
from contract.clock import ScaledClock, local_datetime
from device_runtime.enrollment import Enrollment
from device_runtime.policy import TrainingPolicy
from device_runtime.runtime import Device, DeviceSettings
from device_runtime.transport import RetryPolicy
from emulation.attackers import AttackerPlans, FleetAttack
from emulation.phones import FleetTransport, PlanPool, PooledPlans, RecordingOpStats, SharedSession
from emulation.world import FaultInjector, Faults, FleetMix, PhoneProfile, ScheduledConditions, make_profiles

log = logging.getLogger(__name__)


def _hours(t: dt.time) -> float:
    return t.hour + t.minute / 60 + t.second / 3600


def read_server_clock(path: Path) -> tuple[float, float, float]:
    """(clock_start, clock_speed, clock_epoch) from a server config file (TOML or JSON).

    Raises ValueError naming the missing key: a fleet needs the server on a simulated clock.
    """
    import json
    import tomllib

    text = Path(path).read_text()
    data = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    try:
        return float(data["clock_start"]), float(data.get("clock_speed", 1.0)), float(data["clock_epoch"])
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]} (a fleet needs the server on a simulated "
                         "clock)") from None


def shared_clock(start: float, speed: float, epoch: float,
                 stop: threading.Event | None = None) -> ScaledClock:
    """The device-side twin of the server's clock (contract.clock.ScaledClock, the same three numbers)."""
    return ScaledClock(start, speed, epoch, stop)


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    server_url: str                    # the server (or the load balancer) every phone talks to
    data_dir: Path                     # the phones' data directories go under it
    population: str                    # the population every phone checks in to
    clock: ScaledClock                 # simulated time, the server's twin (shared_clock)
    workers: int = 32                  # phones awake at once (threads)
    trainers: int = 2                  # phones training at once (LiteRT interpreters)
    trainer_threads: int | None = 1    # LiteRT threads per interpreter
    mix: FleetMix = FleetMix()
    faults: Faults = Faults()
    policy: TrainingPolicy = TrainingPolicy()
    task_time_budget_s: float = 3600.0   # a phone gives up a task after an hour (simulated)
    persistent: bool = True            # keep each phone's runtime in memory (see Phone)
    keep_uploads: bool = False         # keep every upload's body (tests decode them)
    enrollment: Enrollment | None = None   # the app credential and attester every phone enrolls with
    operator_token: str | None = None  # to poll the server's round analytics
    attack: FleetAttack | None = None  # a fraction of the phones attack (emulation.attackers)
    personal_models: float = 0.0       # fraction of phones keeping a personal model (each loads its own plan)
    seed: int = 0


@dataclasses.dataclass
class Upload:
    """One upload the server answered, as the phone sent it."""

    phone: int
    session_id: str
    round: int
    model_version: int
    num_examples: int
    status: str
    body: bytes | None               # the encoded update (kept only with `keep_uploads`)


@dataclasses.dataclass
class FleetStatus:
    """What the operator endpoints say, polled while the fleet runs."""

    sim_now: float
    rounds: list[dict]
    versions: list[dict]

    @property
    def train_completed(self) -> int:
        return sum(r["task"] == "train" and r["state"] == "completed" for r in self.rounds)

    @property
    def published(self) -> list[int]:
        return sorted(v["version"] for v in self.versions if v.get("published_at") is not None)


class Phone:
    """One emulated phone: a profile, a data directory, and its runtime.

    With `persistent`, the runtime stays in memory between wake-ups, like a
    phone's keyboard process (a few hundred phones); otherwise it is rebuilt
    from its data directory at every wake-up and closed after, like a process
    the OS killed in between — which is what lets 10,000 phones share one
    host's memory and file descriptors.
    """

    def __init__(self, fleet: "Fleet", profile: PhoneProfile, texts: Sequence[str], attacker: bool = False,
                 personal: bool = False):
        attack = fleet.config.attack if attacker else None
        self.fleet, self.profile, self.attack, self.personal = fleet, profile, attack, personal
        self.texts = attack.texts(texts) if attack else texts
        self.dir = fleet.config.data_dir / "phones" / f"{profile.index:05d}"
        self.wakes = 0
        self.rng = random.Random(profile.seed)
        self.app_version: int | None = None
        self.device: Device | None = None
        clock = fleet.config.clock
        self.conditions = ScheduledConditions(
            profile, lambda: local_datetime(clock, profile.utc_offset_s), clock.now)

    def _build(self) -> Device:
        cfg, fleet, p = self.fleet.config, self.fleet, self.profile
        fresh = not (self.dir / "examples.db").exists()
        seed = p.seed * 1_000_003 + self.wakes
        transport = FleetTransport(cfg.server_url, fleet.session, retry=RetryPolicy(),
                                   sleep=cfg.clock.sleep, seed=seed,
                                   on_upload=lambda *upload: fleet.on_upload(self, *upload))
        device = Device(
            self.dir, cfg.server_url, self.conditions, cfg.policy,
            DeviceSettings(population=cfg.population, utc_offset_s=p.utc_offset_s,
                           task_time_budget_s=cfg.task_time_budget_s, num_threads=cfg.trainer_threads,
                           personal_model=self.personal),
            clock=cfg.clock, seed=seed, transport=transport,
            cache=ArtifactCache(cfg.data_dir / "artifacts", transport, max_bytes=512 << 20),
            plans=(AttackerPlans(fleet.pool, cfg.clock, self.conditions, list(self.texts), fleet.faults,
                                 p.speed_factor, p.slow, attack=self.attack) if self.attack else
                   PooledPlans(fleet.pool, cfg.clock, self.conditions, list(self.texts), fleet.faults,
                               p.speed_factor, p.slow)),
            opstats=RecordingOpStats(self.dir / "opstats.db", fleet.record), enrollment=cfg.enrollment)
        if fresh:   # what its user typed over the last month
            rng = np.random.default_rng(self.profile.seed)
            now = cfg.clock.now()
            device.examples.add_many((t, now - float(rng.uniform(0, 30 * 86400))) for t in self.texts)
        return device

    def wake(self) -> float:
        """One pass of the runtime's loop; returns the simulated seconds it asked to sleep.

        Like a phone's job scheduler, the emulator does not start the runtime while the
        owner's day rules training out (not charging, not idle, not on Wi-Fi, outside the
        window): it sleeps until the schedule next changes. Otherwise the runtime does one
        pass of its loop (`Device.step`), which checks the policy again itself.
        """
        self.wakes += 1
        cfg = self.fleet.config
        if cfg.policy.blockers(self.conditions.read()):
            self.fleet.record(cfg.clock.now(), "policy", "not_eligible", {})
            window = (_hours(cfg.policy.window_start), _hours(cfg.policy.window_end))
            return self.conditions.seconds_until_change(window) + self.rng.uniform(0, 120)
        device = self.device or self._build()
        try:
            before = device.opstats.checkins
            wait = device.step()
            self.conditions.unplug_after_reads(None)   # a task that ended early disarms the fault
            if device.opstats.checkins == before:
                self.fleet.record(cfg.clock.now(), "policy", "not_eligible", {})
            self.app_version = device.predictor.version
            return wait
        finally:
            if self.fleet.config.persistent:
                self.device = device
            else:
                device.close()

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


class Fleet:
    def __init__(self, config: FleetConfig, profiles: Sequence[PhoneProfile],
                 texts: dict[str, Sequence[str]]):
        self.config = config
        self.faults = FaultInjector(config.faults, config.clock.now)
        self.session = SharedSession(self.faults, pool_size=config.workers + 8)
        self.pool = PlanPool(config.trainers, config.trainer_threads)
        bad = config.attack.attackers(len(profiles), config.seed) if config.attack else set()
        keeps = np.random.default_rng([config.seed, 0x9E75]).random(len(profiles)) < config.personal_models
        self.phones = [Phone(self, p, texts[p.client_id], attacker=i in bad, personal=bool(keeps[i]))
                       for i, p in enumerate(profiles)]
        self.stop = config.clock.stop
        self._lock = threading.Lock()
        self.hourly: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.uploads: list[Upload] = []
        self.errors: list[str] = []
        self.wakes = 0

    # -- what the phones report ------------------------------------------------

    def record(self, ts: float, kind: str, outcome: str, detail: dict) -> None:
        """Count a phone's participation-log event in its simulated UTC hour."""
        if kind == "task" and outcome in ("interrupted", "error"):
            outcome = f"{outcome}:{detail.get('reason', 'unknown')}"
        if kind == "task":
            kind = detail.get("task", "train")
        with self._lock:
            self.hourly[int(ts // 3600)][f"{kind}/{outcome}"] += 1

    def on_upload(self, phone: Phone, session_id: str, query: dict, body: bytes, answer: dict) -> None:
        up = Upload(phone.profile.index, session_id, int(answer.get("round", -1)),
                    int(query.get("model_version", -1)), int(query.get("num_examples", 0)),
                    str(answer.get("status")), bytes(body) if self.config.keep_uploads else None)
        with self._lock:
            self.uploads.append(up)

    def prepare(self, threads: int = 8, progress: bool = True) -> None:
        """Create every phone's data directory and example store now, rather than at its first
        wake-up (a large fleet would otherwise spend its first simulated minutes writing them)."""
        from concurrent.futures import ThreadPoolExecutor

        def fill(phone: Phone) -> None:
            if not (phone.dir / "examples.db").exists():
                phone._build().close()

        with ThreadPoolExecutor(threads) as pool:
            list(tqdm(pool.map(fill, self.phones), total=len(self.phones), desc="phones",
                      unit="phone", disable=not progress))

    # -- running -----------------------------------------------------------------

    def run(self, until: Callable[[FleetStatus], bool] = lambda s: False,
            max_sim_s: float = float("inf"), max_wall_s: float = float("inf"),
            progress_total: int | None = None, poll_s: float = 1.0, progress: bool = True,
            on_status: Callable[[FleetStatus], None] | None = None) -> FleetStatus:
        """Run the phones until `until(status)`, `max_sim_s` simulated or `max_wall_s` real seconds.

        The server's operator endpoints are polled every `poll_s` (real) seconds
        for the progress bar, `until` and `on_status`.
        """
        clock, speed = self.config.clock, self.config.clock.speed
        start_sim, start_wall = clock.now(), time.monotonic()
        rng = np.random.default_rng(self.config.seed)
        heap = [(start_wall + rng.uniform(0, 600) / speed, i) for i in range(len(self.phones))]
        heapq.heapify(heap)
        cond = threading.Condition()

        def worker() -> None:
            while not self.stop.is_set():
                with cond:
                    while not self.stop.is_set():
                        due, i = heap[0] if heap else (float("inf"), -1)
                        if due <= time.monotonic():
                            heapq.heappop(heap)
                            break
                        cond.wait(min(due - time.monotonic(), 0.25))
                    else:
                        return
                wait = self._wake(self.phones[i])
                with cond:
                    heapq.heappush(heap, (time.monotonic() + wait / speed, i))
                    cond.notify()

        threads = [threading.Thread(target=worker, name=f"fleet-{k}", daemon=True)
                   for k in range(min(self.config.workers, len(self.phones)))]
        for t in threads:
            t.start()
        bar = tqdm(total=progress_total, desc="rounds", unit="round", disable=not progress,
                   dynamic_ncols=True)
        status = FleetStatus(start_sim, [], [])
        try:
            while True:
                time.sleep(poll_s)
                status = self.status() or status
                bar.n = status.train_completed
                bar.set_postfix_str(self._postfix(status), refresh=True)
                if on_status is not None:
                    on_status(status)
                if (until(status) or status.sim_now - start_sim >= max_sim_s
                        or time.monotonic() - start_wall >= max_wall_s):
                    break
        finally:
            self.stop.set()
            with cond:
                cond.notify_all()
            for t in threads:
                t.join(timeout=120)
            bar.close()
        return self.status() or status

    def _wake(self, phone: Phone) -> float:
        try:
            with self._lock:
                self.wakes += 1
            return phone.wake()
        except Exception:   # a runtime bug must not stop the fleet; it is counted and reported
            with self._lock:
                self.errors.append(f"phone {phone.profile.index}: {traceback.format_exc()[-1500:]}")
            log.exception("phone %d failed", phone.profile.index)
            return 1800.0

    def status(self) -> FleetStatus | None:
        base = f"{self.config.server_url}/v1/populations/{self.config.population}"
        auth = {"Authorization": f"Bearer {self.config.operator_token}"} if self.config.operator_token else {}
        try:
            rounds = requests.get(f"{base}/rounds?limit=1000", headers=auth, timeout=30).json()["rounds"]
            versions = requests.get(f"{base}/versions?limit=1000", headers=auth, timeout=30).json()["versions"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return FleetStatus(self.config.clock.now(), rounds, versions)

    def _postfix(self, s: FleetStatus) -> str:
        now = time.strftime("%a %H:%M", time.gmtime(s.sim_now))
        current = next((r for r in s.rounds if r["state"] in ("selecting", "reporting")), None)
        cur = (f" | round {current['round']} {current['task']}: {current['selected']} sel "
               f"{current['reported']} rep" if current else "")
        return (f"sim {now} UTC | published {len(s.published)} | training {self.pool.busy}"
                f"{cur}")

    def close(self) -> None:
        self.stop.set()
        for phone in self.phones:
            phone.close()
        self.session.close()


def build_fleet(config: FleetConfig, phones: int, client_texts: dict[str, Sequence[str]],
                distinct_clients: bool = True) -> Fleet:
    """A fleet of `phones` phones whose users are training clients of the corpus.

    With `distinct_clients`, phones get different clients as long as there are
    enough (a seeded sample); beyond that, clients are reused round-robin.
    """
    ids = sorted(client_texts)
    rng = np.random.default_rng(config.seed)
    ids = [ids[i] for i in rng.permutation(len(ids))] if distinct_clients else ids
    profiles = make_profiles(phones, ids, config.mix, config.seed)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return Fleet(config, profiles, client_texts)
