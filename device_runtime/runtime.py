"""One device: wait for the right conditions, check in, run the task, report, repeat.

`Device.step()` does one pass of that loop and returns how long to sleep
before the next; `Device.run()` loops until stopped. Everything the device
knows about the world comes through its `ConditionSource` and its `Clock`, so
the same code runs on a Linux host in real time and in the fleet emulator in
simulated time.

How long a step asks to sleep, and why:

* a training condition fails: until the window opens if that is the only
  reason, else `recheck_s` (conditions change on their own: a phone gets
  plugged in);
* the device's own minimum separation since its last completed task has not
  passed (`min_separation_s`, from the participation log): until it has;
* the server rejected the check-in: a uniform draw from the rejection's
  retry window `[min, max]`, always;
* the server could not be reached, or anything failed unexpectedly:
  `unavailable_retry_s` (after the transport's own bounded retries) — a step
  never raises, so the runtime outlives any one failure;
* a task ran: `after_task_s`, short, so the next check-in lets the server say
  when to come back (its rejection window carries its pace steering and its
  own minimum separation).

On unmetered networks the device also looks for a newer published app model,
at most every `app_refresh_s`, whether or not it may train. Where the
population keeps personal models, a step that may train first personalizes
the newest published version if it has not yet (device_runtime.personalization).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
import shutil
import threading
from pathlib import Path

from contract.protocol.errors import ProtocolError
from contract.protocol.wire import Conditions
from device_runtime.client import ArtifactCache, Assignment, Rejection, ServerClient
from contract.clock import Clock, SystemClock, local_datetime
from device_runtime.conditions import ConditionSource, DeviceConditions
from device_runtime.enrollment import Enrollment
from device_runtime.errors import DeviceError, ServerRefused, device_errors
from device_runtime.example_store import ExampleStore
from device_runtime.opstats import OpStats
from device_runtime.personalization import Personalizer
from device_runtime.policy import TrainingPolicy
from device_runtime.predictor import MANIFEST_NAME, Predictor
from device_runtime.task import Task
from device_runtime.transport import Transport
from contract.model.text import split_sentences
from contract.artifacts.manifest import Manifest, read_manifest
from device_runtime.plans import PlanHost, ResidentPlan, plan_key

RUNTIME_VERSION = "1.0.0"
PLAN_MANIFEST = "plan.manifest.json"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    population: str = "en-keyboard"
    utc_offset_s: float = 0.0          # the device's time zone
    task_time_budget_s: float = 1800.0  # give up a task that would run longer than this
    unavailable_retry_s: tuple[float, float] = (600.0, 1200.0)  # server unreachable: back off
    num_threads: int | None = 1        # LiteRT threads
    task_memory_budget_mb: float | None = None   # refuse tasks estimated to need more (None: free memory)
    min_separation_s: float = 0.0      # at least this long between two completed tasks
    after_task_s: tuple[float, float] = (1.0, 5.0)     # wait before the check-in after a task
    recheck_s: tuple[float, float] = (600.0, 1200.0)   # blocked by conditions: look again
    app_refresh_s: float = 6 * 3600.0  # look for a newer app model at most this often
    cache_max_bytes: int = 64 << 20    # downloaded artifacts kept (least recently used go)
    personal_model: bool = True        # keep a personal model for suggestions where the population offers one


class Device:
    """A phone's runtime, with its own data directory (stores, cache, identity).

    Its collaborators can be passed in (the fleet emulator shares an HTTP
    connection pool, an artifact cache and a pool of LiteRT interpreters among
    thousands of phones, and listens to their participation logs); by default
    a device makes its own, as a phone does.
    """

    def __init__(self, data_dir: str | Path, server_url: str, conditions: ConditionSource,
                 policy: TrainingPolicy = TrainingPolicy(), settings: DeviceSettings = DeviceSettings(),
                 clock: Clock | None = None, seed: int | None = None,
                 transport: Transport | None = None, cache: ArtifactCache | None = None,
                 plans: PlanHost | None = None, opstats: OpStats | None = None,
                 enrollment: Enrollment | None = None):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or SystemClock()
        self.conditions, self.policy, self.settings = conditions, policy, settings
        self.enrollment = enrollment
        self.rng = random.Random(seed)
        self.transport = transport or Transport(server_url, sleep=self.clock.sleep, seed=seed)
        self.client = ServerClient(self.transport)
        self.cache = cache or ArtifactCache(self.dir / "artifacts", self.transport,
                                            max_bytes=settings.cache_max_bytes)
        self.plans: PlanHost = plans or ResidentPlan(settings.num_threads)
        self.examples = ExampleStore(self.dir / "examples.db")
        self.opstats = opstats or OpStats(self.dir / "opstats.db")
        self.predictor = Predictor()
        self.predictor.install_latest(self.dir / "app")
        self.personalizer = Personalizer(self.dir, settings.num_threads)
        self.predictor.set_personal(self.personalizer.load())
        self._personalization: tuple[int, dict] | None = None   # the published version's, if offered
        self._next_app_check = float("-inf")
        self.stop = threading.Event()

    # -- identity -----------------------------------------------------------

    @property
    def _identity(self) -> Path:
        return self.dir / "identity.json"

    @property
    def registered(self) -> bool:
        """Whether the device holds credentials from an earlier enrollment."""
        return self._identity.is_file()

    def ensure_registered(self) -> str:
        if self._identity.is_file():
            creds = json.loads(self._identity.read_text())
        else:
            if self.enrollment is None:
                raise ServerRefused(ProtocolError("unauthorized", "this device is not enrolled and has no app "
                                                  "credential and attester to enroll with", status=401))
            device_id, secret = self.client.register(self.settings.population, self.enrollment)
            creds = {"device_id": device_id, "secret": secret}
            tmp = self._identity.with_suffix(".tmp")
            tmp.write_text(json.dumps(creds))
            tmp.chmod(0o600)
            tmp.replace(self._identity)
        self.client.authenticate(creds["device_id"], creds["secret"])
        return creds["device_id"]

    # -- the loop -----------------------------------------------------------

    def local_time(self) -> dt.datetime:
        return local_datetime(self.clock, self.settings.utc_offset_s)

    def step(self) -> float:
        """One check-in (if conditions allow) and its task; returns seconds to sleep. Never raises."""
        try:
            return self._step()
        except DeviceError as e:
            if isinstance(e, ServerRefused) and e.status == 401:
                self._identity.unlink(missing_ok=True)   # the server forgot us: register again
            self.opstats.log(self.clock.now(), "checkin", "error", error=str(e)[:300])
        except Exception as e:   # a bug or a broken disk must not stop the device for good
            log.exception("device step failed")
            self.opstats.log(self.clock.now(), "checkin", "error",
                             error=f"{type(e).__name__}: {e}"[:300])
        return self._uniform(self.settings.unavailable_retry_s)

    def _step(self) -> float:
        c = self.conditions.read()
        if c.unmetered and self.clock.now() >= self._next_app_check:
            self.refresh_app_model()
        texts = self.examples.texts(now=self.clock.now())
        num_examples = self._num_examples(texts)
        blockers = self.policy.blockers(c, num_examples)
        if blockers:
            return self._blocked_wait(blockers, c)
        self.personalize(texts)
        last = self.opstats.last_success()
        if last is not None and self.clock.now() - last < self.settings.min_separation_s:
            return last + self.settings.min_separation_s - self.clock.now()
        self.ensure_registered()
        checkin = Conditions(**c.as_checkin(), num_examples=num_examples, runtime_version=RUNTIME_VERSION)
        t0 = self.clock.now()
        result = self.client.checkin(self.settings.population, checkin)
        if isinstance(result, Rejection):
            self.opstats.log(t0, "checkin", "rejected", reason=result.reason,
                             retry_min_s=result.retry_min_s, retry_max_s=result.retry_max_s)
            return self.rng.uniform(result.retry_min_s, max(result.retry_min_s, result.retry_max_s))
        self.opstats.log(t0, "checkin", "assigned", task=result.task, session=result.session_id)
        self.run_task(result, texts)
        self.refresh_app_model()
        return self._uniform(self.settings.after_task_s)

    def _blocked_wait(self, blockers: list[str], c: DeviceConditions) -> float:
        opens_in = self.policy.seconds_until_window(c.local_time)
        if blockers == ["outside_window"] and opens_in > 0:
            return opens_in
        return self._uniform(self.settings.recheck_s)

    def _uniform(self, bounds: tuple[float, float]) -> float:
        return self.rng.uniform(*bounds)

    def run(self, max_steps: int | None = None) -> None:
        steps = 0
        while not self.stop.is_set() and (max_steps is None or steps < max_steps):
            self.clock.sleep(self.step())
            steps += 1

    # -- tasks --------------------------------------------------------------

    @staticmethod
    def _num_examples(texts: list[str]) -> int:
        """Sentences stored: a lower bound of the windows a plan will make of them."""
        return sum(len(split_sentences(t)) for t in texts)

    def run_task(self, assignment: Assignment, texts: list[str]) -> str:
        """Do the assigned task and report; returns the outcome logged (see device_runtime.task)."""
        return Task(self, assignment, texts).run()

    def plan_manifest(self, assignment: Assignment) -> Manifest:
        """The assignment's plan manifest (downloaded first if needed: a few kB)."""
        return read_manifest(self.cache.get(assignment.plan["manifest"]))

    @staticmethod
    def plan_files(assignment: Assignment, manifest: Manifest) -> dict[str, dict]:
        """File name → artifact reference of everything `load_plan` reads."""
        ref = assignment.plan
        return {manifest.artifact: {"url": ref["url"], "sha256": ref["sha256"]},
                manifest.vocab_file: assignment.vocab, PLAN_MANIFEST: ref["manifest"]}

    def lay_out_plan(self, assignment: Assignment) -> Path:
        """The assignment's plan files, verified, in a directory of their own; the manifest's path.

        Only the current plan's directory is kept.
        """
        key = plan_key(assignment)
        directory = self.cache.materialize(self.plan_files(assignment, self.plan_manifest(assignment)),
                                           self.dir / "plans" / key)
        for other in (self.dir / "plans").iterdir():
            if other.name != key:
                shutil.rmtree(other, ignore_errors=True)
        return directory / PLAN_MANIFEST

    # -- suggestions --------------------------------------------------------

    def personalize(self, texts: list[str]) -> bool:
        """Make the personal model of the published version, if it is offered and not made yet; the
        caller has checked the training conditions. Returns whether one was made (kept or fallen back)."""
        from contract.tasks.personal import PersonalSpec
        from contract.model.text import Vocabulary, to_sequences

        offered = self._personalization
        if (not self.settings.personal_model or offered is None or not texts
                or not self.personalizer.due(offered[0])):
            return False
        version, entry = offered
        t0 = self.clock.now()
        try:
            with device_errors():
                spec = PersonalSpec.from_json(entry["spec"])
                plan = entry["plan"]
                manifest = read_manifest(self.cache.get(plan["manifest"]))
                directory = self.cache.materialize(
                    {manifest.artifact: {"url": plan["url"], "sha256": plan["sha256"]},
                     manifest.vocab_file: entry["vocab"], PLAN_MANIFEST: plan["manifest"]},
                    self.dir / "personal.src")
                windows = to_sequences(texts, Vocabulary.load(directory / manifest.vocab_file), manifest.seq_len)
                result = self.personalizer.refresh(directory / PLAN_MANIFEST, self.cache.get(entry["checkpoint"]),
                                                   windows, spec, version)
        except DeviceError as e:
            self.opstats.log(t0, "personalize", "error", error=e.detail[:300])
            return False
        finally:
            shutil.rmtree(self.dir / "personal.src", ignore_errors=True)
        self.predictor.set_personal(self.personalizer.load())
        g, p = result.validation
        self.opstats.log(t0, "personalize", "fell_back" if result.fell_back else "kept", version=version,
                         held_back_global_top1=g.top1, held_back_personal_top1=p.top1, positions=g.positions)
        return True

    def refresh_app_model(self) -> int | None:
        """Install the server's published app model if it is not the current one.

        Follows the server also back to an older version (an operator's
        rollback). Never raises: a failed refresh is logged and retried at
        the next refresh. A model whose manifest is of a schema version this
        phone does not read (contract.artifacts.manifest.SUPPORTED_SCHEMA_VERSIONS:
        a newer server's) is refused the same way, and the current model stays.
        """
        self._next_app_check = self.clock.now() + self.settings.app_refresh_s
        try:
            with device_errors():
                version = self._install_published()
        except DeviceError as e:
            self.opstats.log(self.clock.now(), "app_model", "error", error=e.detail[:300])
            return self.predictor.version
        if version is None:
            return self.predictor.version
        self.opstats.log(self.clock.now(), "app_model", "installed", version=version)
        for old in (self.dir / "app").iterdir():
            if old.name != str(version):
                shutil.rmtree(old, ignore_errors=True)
        return self.predictor.version

    def _install_published(self) -> int | None:
        """Note what the published version offers for personalization, and install it if it is not the
        current one; the version installed (None: nothing to install)."""
        published = self.client.app_model(self.settings.population)
        if published and published.get("personalization"):
            self._personalization = (int(published["version"]), published["personalization"])
        elif published:
            self._personalization = None
        if not published or published.get("version") == self.predictor.version:
            return None
        version = int(published["version"])
        read_manifest(self.cache.get(published["manifest"]))   # a manifest newer than this phone reads is
        # refused here (SchemaMismatch), before the model is downloaded; the current model stays
        files = {name: {"url": f["url"], "sha256": f["sha256"]} for name, f in published["files"].items()}
        files[MANIFEST_NAME] = published["manifest"]
        directory = self.cache.materialize(files, self.dir / "app" / str(version))
        self.predictor.install(directory / MANIFEST_NAME, allow_older=True)
        return version

    def close(self) -> None:
        self.stop.set()
        self.examples.close()
        self.opstats.close()
        self.transport.close()
