"""One device: wait for the right conditions, check in, run the task, report, repeat.

`Device.step()` does one pass of that loop and returns how long to sleep
before the next; `Device.run()` loops until stopped. Everything the device
knows about the world comes through its `ConditionSource` and its `Clock`, so
the same code runs on a Linux host in real time and in the fleet emulator in
simulated time.
"""
from __future__ import annotations

import dataclasses
import json
import random
import threading
from pathlib import Path

import numpy as np

from device_runtime.client import (ArtifactCache, Assignment, CorruptDownload, ProtocolError,
                                   Rejection, ServerClient)
from device_runtime.clock import Clock, RealClock, local_datetime
from device_runtime.conditions import ConditionSource
from device_runtime.example_store import ExampleStore
from device_runtime.opstats import OpStats
from device_runtime.policy import TrainingPolicy
from device_runtime.predictor import Predictor
from device_runtime.training import Hyperparameters, Interrupted, local_windows, train_locally
from device_runtime.transport import ServerUnavailable, Transport
from models.metrics import Hits, count_hits
from models.text import split_sentences
from models.weights import load_checkpoint
from tflite_export.reader import load_plan

RUNTIME_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    population: str = "en-keyboard"
    utc_offset_s: float = 0.0          # the device's time zone
    task_time_budget_s: float = 1800.0  # give up a task that would run longer than this
    unavailable_retry_s: tuple[float, float] = (600.0, 1200.0)  # server unreachable: back off
    speed_factor: float = 1.0          # emulation: >1 makes training take longer in simulated time
    num_threads: int | None = 1        # LiteRT threads


class Device:
    """A phone's runtime, with its own data directory (stores, cache, identity)."""

    def __init__(self, data_dir: str | Path, server_url: str, conditions: ConditionSource,
                 policy: TrainingPolicy = TrainingPolicy(), settings: DeviceSettings = DeviceSettings(),
                 clock: Clock | None = None, seed: int | None = None,
                 transport: Transport | None = None):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or RealClock()
        self.conditions, self.policy, self.settings = conditions, policy, settings
        self.rng = random.Random(seed)
        self.transport = transport or Transport(server_url, sleep=self.clock.sleep, seed=seed)
        self.client = ServerClient(self.transport)
        self.cache = ArtifactCache(self.dir / "artifacts", self.transport)
        self.examples = ExampleStore(self.dir / "examples.db")
        self.opstats = OpStats(self.dir / "opstats.db")
        self.predictor = Predictor()
        self._plans: dict[str, object] = {}
        self._started_at = float("inf")   # start of the running task (simulated time)
        self.stop = threading.Event()

    # -- identity -----------------------------------------------------------

    def ensure_registered(self) -> str:
        ident = self.dir / "identity.json"
        if ident.is_file():
            creds = json.loads(ident.read_text())
        else:
            device_id, secret = self.client.register()
            creds = {"device_id": device_id, "secret": secret}
            tmp = ident.with_suffix(".tmp")
            tmp.write_text(json.dumps(creds))
            tmp.chmod(0o600)
            tmp.replace(ident)
        self.client.authenticate(creds["device_id"], creds["secret"])
        return creds["device_id"]

    # -- the loop -----------------------------------------------------------

    def local_time(self):
        return local_datetime(self.clock, self.settings.utc_offset_s)

    def step(self) -> float:
        """One check-in (if conditions allow) and its task; returns seconds to sleep."""
        c = self.conditions.read()
        blockers = self.policy.blockers(c)
        if blockers:
            wait = self.policy.seconds_until_window(c.local_time) if blockers == ["outside_window"] else 0
            return max(wait, self.rng.uniform(600, 1200))
        try:
            self.ensure_registered()
            texts = self.examples.texts(now=self.clock.now())
            checkin = {**c.as_checkin(), "num_examples": self._num_examples(texts),
                       "runtime_version": RUNTIME_VERSION}
            t0 = self.clock.now()
            result = self.client.checkin(self.settings.population, checkin)
            if isinstance(result, Rejection):
                self.opstats.log(t0, "checkin", "rejected", reason=result.reason)
                return self.rng.uniform(result.retry_min_s, max(result.retry_min_s, result.retry_max_s))
            self.opstats.log(t0, "checkin", "assigned", task=result.task, session=result.session_id)
            self.run_task(result, texts)
            self.refresh_app_model()
            return self.rng.uniform(*self.settings.unavailable_retry_s)
        except (ServerUnavailable, ProtocolError, CorruptDownload) as e:
            self.opstats.log(self.clock.now(), "checkin", "error", error=str(e)[:300])
            return self.rng.uniform(*self.settings.unavailable_retry_s)

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

    def _plan(self, assignment: Assignment):
        plan_ref = assignment.raw["plan"]
        key = plan_ref["manifest"]["sha256"]
        if key not in self._plans:
            manifest_path = self.cache.get(plan_ref["manifest"])
            manifest = json.loads(manifest_path.read_text())
            files = {manifest["artifact"]: plan_ref,
                     manifest["vocab_file"]: assignment.raw["vocab"],
                     "plan.manifest.json": plan_ref["manifest"]}
            directory = self.cache.materialize(files, self.dir / "plans" / key)
            self._plans[key] = load_plan(directory / "plan.manifest.json",
                                         num_threads=self.settings.num_threads)
        return self._plans[key]

    def run_task(self, assignment: Assignment, texts: list[str]) -> str:
        """Train (or evaluate) and report; returns the outcome code."""
        self._started_at = self.clock.now()
        bytes_before = (self.transport.bytes_sent, self.transport.bytes_received)
        try:
            plan = self._plan(assignment)
            _, initial, _ = load_checkpoint(self.cache.get(assignment.raw["checkpoint"]))
            windows = local_windows(plan, texts)
            t_fetched = self.clock.now()
            if assignment.task == "eval":
                outcome = self._evaluate(plan, initial, windows, assignment)
            else:
                hp = assignment.hyperparameters
                update = train_locally(plan, initial, windows, Hyperparameters(
                    float(hp["learning_rate"]), int(hp["epochs"]), int(hp["batch_size"]),
                    int(hp["seed"]), hp.get("max_examples")), should_stop=self._should_stop)
                self._spend_simulated_time(update.metrics["train_seconds"])
                reason = self._should_stop()
                if reason:
                    raise Interrupted(reason, int(update.metrics["batches"]))
                t_trained = self.clock.now()
                answer = self.client.upload(assignment, update.delta, update.num_examples,
                                            update.metrics)
                outcome = answer.get("status", "unknown")
                self.opstats.log(self._started_at, "task", "completed" if outcome == "accepted" else outcome,
                                 session=assignment.session_id, examples=update.num_examples,
                                 download_s=t_fetched - self._started_at,
                                 train_s=t_trained - t_fetched, upload_s=self.clock.now() - t_trained,
                                 **self._bytes_since(bytes_before))
            return outcome
        except Interrupted as e:
            self._report_failure(assignment, e.reason, str(e), bytes_before)
            return "interrupted"
        except (CorruptDownload, ValueError) as e:
            self._report_failure(assignment, "error", f"{type(e).__name__}: {e}", bytes_before)
            return "error"
        finally:
            self._started_at = float("inf")

    def _should_stop(self) -> str | None:
        reasons = self.policy.blockers(self.conditions.read())
        if self.clock.now() - self._started_at > self.settings.task_time_budget_s:
            reasons.append("out_of_time")
        return reasons[0] if reasons else None

    def _spend_simulated_time(self, real_seconds: float) -> None:
        """Emulation: a slower phone takes longer; sleep the extra in simulated time."""
        extra = real_seconds * (self.settings.speed_factor - 1.0)
        if extra > 0:
            self.clock.sleep(extra)

    def _evaluate(self, plan, initial: np.ndarray, windows: np.ndarray, assignment: Assignment) -> str:
        plan.set_weights(initial)
        hits, loss_sum = Hits(), 0.0
        for start in range(0, len(windows), plan.batch_size):
            w = windows[start:start + plan.batch_size]
            logits = plan.infer(w[:, :-1])
            hits = hits + count_hits(logits, w[:, 1:])
            loss_sum += _loss_sum(logits, w[:, 1:])
        answer = self.client.report_eval(assignment, hits.top1, hits.top3, hits.positions, loss_sum)
        self.opstats.log(self._started_at, "eval", answer.get("status", "unknown"),
                         session=assignment.session_id, positions=hits.positions)
        return answer.get("status", "unknown")

    def _report_failure(self, assignment: Assignment, reason: str, detail: str, before) -> None:
        self.opstats.log(self._started_at, "task", "aborted", session=assignment.session_id,
                         reason=reason, **self._bytes_since(before))
        try:
            self.client.report_failure(assignment, reason, detail)
        except (ServerUnavailable, ProtocolError):
            pass   # the round's deadline will count us as dropped anyway

    def _bytes_since(self, before) -> dict:
        return {"bytes_out": self.transport.bytes_sent - before[0],
                "bytes_in": self.transport.bytes_received - before[1]}

    # -- suggestions --------------------------------------------------------

    def refresh_app_model(self) -> int | None:
        """Install the latest published app model if it is newer than the current one."""
        try:
            published = self.client.app_model(self.settings.population)
        except (ServerUnavailable, ProtocolError):
            return self.predictor.version
        if not published or published.get("version") == self.predictor.version:
            return self.predictor.version
        files = {name: {"url": f["url"], "sha256": f["sha256"]}
                 for name, f in published["files"].items()}
        files["app.manifest.json"] = published["manifest"]
        directory = self.cache.materialize(files, self.dir / "app" / str(published["version"]))
        return self.predictor.install(directory / "app.manifest.json")

    def close(self) -> None:
        self.stop.set()
        self.examples.close()
        self.opstats.close()
        self.transport.close()


def _loss_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float((nll * (targets != 0)).sum())
