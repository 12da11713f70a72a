"""What lets a real `Device` live among thousands in one process, plugged in through its interfaces.

The runtime is used unchanged; only what a phone would own alone is shared or
wrapped, and handed to `Device(...)` as its collaborators:

* `SharedSession` — one HTTP connection pool for the whole fleet (10,000
  `requests.Session`s would each keep sockets to the server), and the place
  where network faults are injected, below the runtime's retrying
  `Transport`, so the runtime's own retry logic is what copes with them;
* `FleetTransport` — a phone's retrying transport over that session, which
  also tells the fleet what each upload carried and what the server answered
  (the fault test checks the server's model against it);
* `PlanPool` / `PooledPlans` — the training plans, as LiteRT interpreters.
  A phone holds one only while it trains, and at most `slots` phones train at
  once: the interpreters (and the CPU) are the scarce resource, not the
  phones. `PooledPlans` is the phone's `device_runtime.plans.PlanHost`; it is
  also where the emulator pulls a phone's plug mid-training and lets a slower
  phone's extra compute time pass;
* `RecordingOpStats` — the phone's participation log, also counted by the fleet.
"""
from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contract.model.batching import epoch_orders
from contract.update.packing import pack
from device_runtime.client import Assignment
from device_runtime.opstats import OpStats
from device_runtime.plans import plan_key
from device_runtime.training import local_windows
from device_runtime.transport import Transport
from emulation.world import FaultInjector, ScheduledConditions
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
        credential = str((kwargs.get("headers") or {}).get("Authorization", ""))
        if credential and self.faults.vanishing(method, urlsplit(url).path, credential) == "before":
            raise requests.ConnectionError(f"injected: the phone is gone ({method} {url})")
        lost = self.faults.lose_upload(url) if method == "POST" and "/update" in url else None
        if lost == "request_lost":
            raise requests.ConnectionError(f"injected: upload lost before sending ({url})")
        if lost == "response_lost":
            self._session.request(method, url, **kwargs)
            raise requests.ConnectionError(f"injected: upload answer lost ({url})")
        return self._session.request(method, url, **kwargs)

    def close(self) -> None:
        self._session.close()


def tamper(kind: str, params: dict, body: bytes) -> tuple[dict, bytes]:
    """An upload altered as an attacker on the phone would (emulation.world.TAMPERING).

    Works on the encoded update itself (contract.update.pipeline's wire format), so
    it needs no model: the weight claimed, or the codes, scales or values are
    rewritten in place.
    """
    if kind == "claims_huge_weight":
        return {**params, "num_examples": 10**6}, body
    tensors = {k: v.copy() for k, v in st_load(body).items()}
    (header_len,) = struct.unpack("<Q", body[:8])
    meta = json.loads(body[8:8 + header_len]).get("__metadata__") or {}
    if "values" in tensors:                     # float32 updates
        values = tensors["values"]
        peak = float(np.abs(values).max(initial=0.0))
        if kind == "out_of_range":
            values[0] = 1e30
        elif kind == "scaled_up":
            values *= np.float32(1e6)
        else:
            values[:] = np.where(values < 0, -peak, peak)
    elif kind == "scaled_up":
        tensors["scales"] *= np.float32(2**20)
    elif kind == "out_of_range":                # the unused top code, 2^bits - 1
        tensors["codes"][: 2 if meta.get("bits") == "16" else 1] = 0xFF
    else:                                       # every value +L, every scale the largest
        bits = int(meta["bits"])
        tensors["codes"][:] = pack(np.full(len(tensors["codes"]) * 8 // bits, 2 ** (bits - 1) - 1), bits)
        tensors["scales"][:] = tensors["scales"].max()
    return params, st_save(tensors, metadata=meta)


UploadListener = Callable[[str, dict, bytes, dict], None]   # session id, query, body, answer


class FleetTransport(Transport):
    """The runtime's retrying transport over the fleet's shared session.

    Every upload the server answered (200) is reported to `on_upload` with
    its session id, query parameters, body and the server's answer, as sent:
    a phone chosen to tamper (emulation.world.Faults) alters its upload here,
    below the runtime, as an attacker who rewrote the app would.
    """

    def __init__(self, base_url: str, session: SharedSession, on_upload: UploadListener | None = None,
                 **kwargs):
        super().__init__(base_url, **kwargs)
        super().close()                 # the private session it made is never used
        self.session = session
        self._on_upload = on_upload

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        if method == "POST" and urlsplit(path).path.endswith("/update"):
            kind = self.session.faults.tampering(path)
            if kind is not None:
                kwargs["params"], kwargs["data"] = tamper(kind, dict(kwargs.get("params") or {}),
                                                          kwargs.get("data") or b"")
        resp = super().request(method, path, **kwargs)
        if (self._on_upload is not None and method == "POST" and resp.status_code == 200
                and urlsplit(path).path.endswith("/update")):
            session_id = urlsplit(path).path.split("/")[-2]
            query = {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}
            query.update({k: str(v) for k, v in (kwargs.get("params") or {}).items()})
            self._on_upload(session_id, query, kwargs.get("data") or b"", resp.json())
        return resp

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


class PooledPlans:
    """One phone's `PlanHost`: plans borrowed from the fleet's `PlanPool`.

    At `acquire`, an injected fault may arm the phone's conditions to report
    it unplugged after one of the task's batches. At `release`, the emulated
    phone's own speed is applied: a phone `speed_factor` times slower than
    this host lets the extra compute time pass on the simulated clock (its
    CPU is not this host's), and a `slow` phone finishes only after the
    round's deadline — the runtime's own deadline check then gives the task up.
    """

    def __init__(self, pool: PlanPool, clock, conditions: ScheduledConditions, texts: list[str],
                 faults: FaultInjector, speed_factor: float = 1.0, slow: bool = False):
        self.pool, self.clock, self.conditions, self.texts = pool, clock, conditions, texts
        self.faults, self.speed_factor, self.slow = faults, speed_factor, slow

    def loaded(self, assignment: Assignment) -> bool:
        return False   # the pool's plans are not the phone's own: always verify the files

    def acquire(self, assignment: Assignment, lay_out: Callable[[], Path]) -> TrainingPlan:
        plan = self.pool.acquire(plan_key(assignment), lay_out)
        if assignment.task == "train" and self.faults.unplug():
            self._arm_unplug(plan, assignment)
        return plan

    def release(self, assignment: Assignment, plan: TrainingPlan, *, healthy: bool,
                compute_s: float) -> None:
        self.pool.release(plan_key(assignment), plan if healthy else None)
        if self.slow:
            self.clock.sleep(max(0.0, assignment.report_deadline - self.clock.now()) + 60.0)
        extra = compute_s * (self.speed_factor - 1.0)
        if extra > 0:
            self.clock.sleep(extra)

    def _arm_unplug(self, plan: TrainingPlan, a: Assignment) -> None:
        """Pull the plug after one of the task's batches (the runtime reads conditions before
        each batch and once after the last, so reading 2..batches+1 falls mid-task)."""
        hp = a.hyperparameters
        n = len(local_windows(plan, self.texts))
        batches = sum(-(-len(order) // int(hp["batch_size"]))
                      for order in epoch_orders(n, int(hp["epochs"]), 0, hp.get("max_examples")))
        self.conditions.unplug_after_reads(self.faults.unplug_read(a.session_id, batches))


class RecordingOpStats(OpStats):
    """A phone's participation log that also tells the fleet about every event."""

    def __init__(self, path: Path, record: Callable[[float, str, str, dict], None]):
        super().__init__(path)
        self._record = record
        self.checkins = 0

    def log(self, ts: float, kind: str, outcome: str, **detail) -> None:
        super().log(ts, kind, outcome, **detail)
        self.checkins += kind == "checkin"
        self._record(ts, kind, outcome, detail)
