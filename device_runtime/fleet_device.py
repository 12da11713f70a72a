"""A real `Device`, adapted to live among thousands in one process.

The runtime is used unchanged; only what a phone would own alone is shared or
wrapped, by composition:

* `SharedSession` — one HTTP connection pool for the whole fleet (10,000
  `requests.Session`s would each keep sockets to the server), and the place
  where network faults are injected, below the runtime's retrying
  `Transport`, so the runtime's own retry logic is what copes with them;
* `PlanPool` — the training plans, as LiteRT interpreters. A phone holds one
  only while it trains, and at most `slots` phones train at once: the
  interpreters (and the CPU) are the scarce resource, not the phones;
* one `ArtifactCache` directory for all phones: artifacts are content-addressed
  and verified, so phones may share the bytes they downloaded;
* `RecordingClient` — tells the fleet what each phone uploaded and what the
  server answered (the fault test checks the server's model against it).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from device_runtime.client import ArtifactCache, Assignment
from device_runtime.fleet_world import FaultInjector, ScheduledConditions
from device_runtime.runtime import Device
from device_runtime.training import local_windows
from device_runtime.transport import Transport
from models.batching import epoch_orders
from tflite_export.reader import TrainingPlan, load_plan


class SharedSession:
    """A thread-safe stand-in for `requests.Session` shared by every phone, with faults.

    An injected upload fault hits the first attempt of an upload only:
    ``request_lost`` fails before anything is sent, ``response_lost`` after
    the server has processed the upload (the retry must then get the same
    answer, and the server must not count the update twice).
    """

    def __init__(self, faults: FaultInjector, pool_size: int = 64):
        self.faults = faults
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def request(self, method: str, url: str, **kwargs) -> requests.Response:
        if self.faults.network_error():
            raise requests.ConnectionError(f"injected network error: {method} {url}")
        lost = self.faults.lose_upload(url) if method == "POST" and "/update" in url else None
        if lost == "request_lost":
            raise requests.ConnectionError(f"injected: upload lost before sending ({url})")
        if lost == "response_lost":
            self._session.request(method, url, **kwargs)
            raise requests.ConnectionError(f"injected: upload answer lost ({url})")
        return self._session.request(method, url, **kwargs)

    def close(self) -> None:
        self._session.close()


class FleetTransport(Transport):
    """The runtime's retrying transport over the fleet's shared session."""

    def __init__(self, base_url: str, session: SharedSession, **kwargs):
        super().__init__(base_url, **kwargs)
        super().close()                 # the private session it made is never used
        self.session = session

    def close(self) -> None:
        """The shared session outlives any one phone."""


class PlanPool:
    """LiteRT training plans lent to phones while they train; at most `slots` lent at a time.

    A returned plan is kept for the next phone (set_weights makes it as good
    as new); plans of an older plan version are dropped when a newer one is
    first needed, so at most `slots` interpreters exist.
    """

    def __init__(self, slots: int, num_threads: int | None = 1):
        self.slots, self.num_threads = slots, num_threads
        self._free: dict[str, list[TrainingPlan]] = {}
        self._slots = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.loaded = 0      # interpreters in existence
        self.busy = 0        # lent out now

    def acquire(self, key: str, manifest: Callable[[], Path]) -> TrainingPlan:
        """A plan for `key` (its manifest's sha256); `manifest()` lays the files out if needed."""
        self._slots.acquire()
        with self._lock:
            self.busy += 1
            if self._free.get(key):
                return self._free[key].pop()
            for other in [k for k in self._free if k != key]:
                self.loaded -= len(self._free.pop(other))
        try:
            with self._load_lock:
                plan = load_plan(manifest(), num_threads=self.num_threads)
        except BaseException:
            with self._lock:
                self.busy -= 1
            self._slots.release()
            raise
        with self._lock:
            self.loaded += 1
        return plan

    def release(self, key: str, plan: TrainingPlan | None) -> None:
        """Give a plan back; None drops it (LiteRT may have failed half-way through a step)."""
        with self._lock:
            self.busy -= 1
            if plan is None:
                self.loaded -= 1
            else:
                self._free.setdefault(key, []).append(plan)
        self._slots.release()


class RecordingClient:
    """Wraps a `ServerClient`; reports every upload (delta, weight, answer) to `on_upload`."""

    def __init__(self, client, on_upload: Callable[[Assignment, np.ndarray, int, dict], None]):
        self._client, self._on_upload = client, on_upload

    def upload(self, assignment: Assignment, delta: np.ndarray, num_examples: int,
               metrics: dict[str, float]) -> dict:
        answer = self._client.upload(assignment, delta, num_examples, metrics)
        self._on_upload(assignment, delta, num_examples, answer)
        return answer

    def __getattr__(self, name: str):
        return getattr(self._client, name)


class FleetDevice(Device):
    """A `Device` that borrows its plan from a `PlanPool` and obeys injected faults.

    Everything else — policy checks, check-in, download and verification,
    interruptible LiteRT training, upload and failure reports, app-model
    refresh — is the runtime's own code. Three runtime hooks are overridden:
    `_plan` (where a task gets its loaded plan: borrow one, waiting for a free
    training slot, and arm an injected unplugging), `_spend_simulated_time`
    (called once the plan's work is done: give the interpreter back, then let
    a slower phone's extra time pass) and `forget_plan` (LiteRT failed: drop
    the interpreter instead of returning it).
    """

    def __init__(self, *args, pool: PlanPool, shared_cache: Path, plans_dir: Path,
                 faults: FaultInjector | None = None, slow: bool = False,
                 on_upload: Callable[[Assignment, np.ndarray, int, dict], None] | None = None,
                 cache_max_bytes: int = 512 << 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = ArtifactCache(shared_cache, self.transport, max_bytes=cache_max_bytes)
        self.pool, self.plans_dir, self.slow = pool, plans_dir, slow
        self.faults = faults or FaultInjector()
        if on_upload is not None:
            self.client = RecordingClient(self.client, on_upload)
        self._held: tuple[str, TrainingPlan] | None = None
        self._assignment: Assignment | None = None
        self._texts: list[str] = []

    def run_task(self, assignment: Assignment, texts: list[str]) -> str:
        self._assignment, self._texts = assignment, texts
        try:
            return super().run_task(assignment, texts)
        finally:
            self._give_back()
            self._assignment = None
            if isinstance(self.conditions, ScheduledConditions):
                self.conditions.unplug_after_reads(None)   # a task that ended early disarms it

    def _plan(self, assignment: Assignment) -> TrainingPlan:
        key = assignment.raw["plan"]["manifest"]["sha256"]

        def lay_out() -> Path:
            files = self.plan_files(assignment, self.plan_manifest(assignment))
            return self.cache.materialize(files, self.plans_dir / key) / "plan.manifest.json"

        plan = self.pool.acquire(key, lay_out)
        self._held = (key, plan)
        if assignment.task == "train" and self.faults.unplug():
            self._arm_unplug(plan, assignment)
        return plan

    def plan_loaded(self, assignment: Assignment) -> bool:
        return False   # the pool's plans are not the phone's own: always verify the files

    def _give_back(self) -> None:
        if self._held is not None:
            key, plan = self._held
            self._held = None
            self.pool.release(key, plan)

    def forget_plan(self) -> None:
        """The task failed, maybe inside LiteRT half-way: drop the interpreter, free the slot."""
        if self._held is not None:
            self.pool.release(self._held[0], None)
            self._held = None

    def _spend_simulated_time(self, real_seconds: float) -> None:
        """The plan's work is done: return the interpreter, then let the phone's extra time pass
        (a slower phone's share is not this host's CPU). A phone too slow for the round finishes
        only after its deadline; the runtime's own deadline check then gives up the task."""
        self._give_back()
        a = self._assignment
        if self.slow and a is not None:
            self.clock.sleep(max(0.0, a.raw["report_deadline"] - self.clock.now()) + 60.0)
        super()._spend_simulated_time(real_seconds)

    def _arm_unplug(self, plan: TrainingPlan, a: Assignment) -> None:
        """Pull the plug after one of the task's batches (the runtime reads conditions before
        each batch and once after the last, so reading 2..batches+1 falls mid-task)."""
        hp = a.hyperparameters
        n = len(local_windows(plan, self._texts))
        batches = sum(-(-len(order) // int(hp["batch_size"]))
                      for order in epoch_orders(n, int(hp["epochs"]), 0, hp.get("max_examples")))
        if isinstance(self.conditions, ScheduledConditions):
            self.conditions.unplug_after_reads(self.faults.unplug_read(a.session_id, batches))
