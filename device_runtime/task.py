"""One assigned task, from its artifacts to its report.

Phases, each timed into the participation log so `status` and the benchmark
show where a task's time goes:

* secagg_share (secure aggregation only): advertise keys, send shares
  (device_runtime.secagg; then secagg_wait before the upload and
  secagg_unmask after it);
* download: the plan's manifest, then (if the budgets allow) the plan, its
  vocabulary and the round's checkpoint, each verified by sha256 and cached
  (a plan is fetched once per plan, a checkpoint once per round);
* prepare: LiteRT loads the plan (kept loaded while the plan is the same),
  the checkpoint is read and the stored text tokenized with the plan's
  vocabulary;
* train (FedAvg's client step, `training.train_locally`) or eval (top-1/top-3
  hits as `contract.model.metrics` defines them, and the summed loss), or, for a
  discover task, only the vocabulary and the votes (device_runtime.discovery);
* upload: the delta or the counts.

Every way a task can end is reported to the server and logged, and none
raises out of `Task.run`:

* `completed` — the server accepted the report; `discarded` — it answered
  `aborted` (round closed, goal reached, late: the work was not needed);
* `interrupted` — a training condition failed between two batches (its
  policy code: unplugged, outside_window, metered_network, ...), the task
  ran past its time budget (`out_of_time`: the device's budget or the
  server's report deadline, whichever is sooner), or it would not fit in
  memory (`out_of_memory`, decided from the plan's manifest before the plan
  is downloaded);
* `error` — anything else: a download that kept failing its hash, an
  unreadable plan or checkpoint, LiteRT failing, the server refusing the
  upload or being unreachable.

Nothing of an unfinished task survives: the plan's weights are reset, and
only a failure reason code goes up (the technical detail stays in the
participation log on the phone).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from contract.protocol.wire import Outcome
from contract.secagg.masking import SecAggError
from device_runtime.client import Assignment, CorruptDownload, ProtocolError
from device_runtime.discovery import votes
from device_runtime.secagg import SecAggLeft, SecureAggregation
from device_runtime.training import Hyperparameters, Interrupted, local_windows, train_locally
from device_runtime.transport import ServerUnavailable
from contract.model.metrics import Hits, count_hits
from contract.model.text import PAD_ID, Vocabulary, split_sentences
from contract.model.weights import load_checkpoint
from contract.artifacts.errors import ArtifactError
from contract.artifacts.manifest import Manifest
from tflite_export.reader import TrainingPlan

if TYPE_CHECKING:
    from device_runtime.runtime import Device


UNMASK_GRACE_S = 900.0     # how long after its report deadline a phone stays for the unmasking


class TaskFailed(Exception):
    """The task cannot go on; `reason` is one of the server's failure reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def estimated_task_memory_mb(manifest: Manifest, num_sentences: int, epochs: int) -> float:
    """Memory a task with this plan needs beyond what the runtime already uses, in MiB.

    Measured on this project's Gboard plan (1.42 M weights, 10,004 words,
    batch 16 × 20 tokens, 1 LiteRT thread): loading and training it grows a
    bare process by ~154 MiB (a whole device process, stores and HTTP
    included, by ~163 MiB: benchmarks/device.py). Most of it is LiteRT's
    arena of activations and their gradients, which scale with the logits
    (batch × seq_len × vocabulary floats); the rest copies of the weights
    (variables, gradients, the flat vectors in and out, the plan's bytes). The estimate — 16 MiB + 8 ×
    the weights + 10 × one batch of logits + the token windows — is 182 MiB
    for that plan and errs high for the TINY one too (a test checks it
    covers TINY's measured growth).
    """
    mib = 1 << 20
    weights = manifest.layout.size * 4 / mib
    vocab = int(manifest.model_config["vocab_size"])
    logits = (manifest.batch_size or 1) * manifest.seq_len * vocab * 4 / mib
    windows = num_sentences * (manifest.seq_len + 1) * 4 * (1 + max(epochs, 1)) / mib
    return 16.0 + 8.0 * weights + 10.0 * logits + windows


class Task:
    """One assignment, run by `device` on its stored `texts`."""

    def __init__(self, device: "Device", assignment: Assignment, texts: list[str]):
        self.d, self.a, self.texts = device, assignment, texts
        self.started = device.clock.now()
        budget = device.settings.task_time_budget_s
        if assignment.report_deadline_in_s > 0:
            budget = min(budget, assignment.report_deadline_in_s)
        self.deadline = self.started + budget
        # the unmasking comes after the round's report deadline, which may be later than the task's
        self.unmask_until = max(self.deadline, self.started + assignment.report_deadline_in_s) + UNMASK_GRACE_S
        self.phases: dict[str, float] = {}   # phase name + "_s" → seconds (clock time)
        self.batches = 0
        self.examples = 0
        self._running, self._mark = "download", self.started
        self._bytes = (device.transport.bytes_sent, device.transport.bytes_received)
        self._plan: TrainingPlan | None = None   # held from prepare until the compute is done
        secure = assignment.update is not None and assignment.update.spec.secure_aggregation
        self.secagg = SecureAggregation(device.client, assignment, device.clock, self.should_stop) \
            if secure and assignment.task in ("train", "personalize") else None

    def run(self) -> str:
        """Run the task and report it; returns the outcome logged (see the module docstring)."""
        try:
            if self.secagg is not None:     # keys and shares first: short phases, before the long download
                self._next_phase("secagg_share")
                self.secagg.advertise()
                self.secagg.share()
                self._next_phase("download")
            if self.a.task == "discover":   # no plan, no checkpoint: the vocabulary and the text
                answer = self._discover()
            else:
                plan, initial, windows = self._prepare()
                if self.a.task == "eval":
                    answer = self._evaluate(plan, initial, windows)
                elif self.a.task == "personalize":
                    answer = self._personalize(plan, initial, windows)
                else:
                    answer = self._train(plan, initial, windows)
        except Interrupted as e:
            self.batches = e.batches_done
            return self._fail("interrupted", e.reason, str(e))
        except (TaskFailed, SecAggLeft) as e:
            return self._fail("interrupted" if e.reason != "error" else "error", e.reason, e.detail)
        except SecAggError as e:             # a message that does not check out, or a rule to keep
            self._release_plan(healthy=True)
            return self._fail("error", "error", f"secure aggregation: {e}")
        except MemoryError:
            self._release_plan(healthy=False)
            return self._fail("interrupted", "out_of_memory", "MemoryError")
        except (CorruptDownload, ArtifactError, ProtocolError, ServerUnavailable, OSError,
                ValueError, RuntimeError) as e:
            self._release_plan(healthy=False)   # LiteRT may have failed half-way: reload it next time
            return self._fail("error", "error", f"{type(e).__name__}: {e}")
        finally:
            self._release_plan(healthy=True)
        outcome = "completed" if answer.status == "accepted" else "discarded"
        detail = {"reason": answer.reason} if answer.reason else {}
        if self.secagg is not None and answer.status == "accepted":
            detail["secagg"] = self._reveal()
        self._log(outcome, **detail)
        return outcome

    def _reveal(self) -> str:
        """After a masked upload: take part in the unmasking; how that went (the upload stands)."""
        self._next_phase("secagg_unmask")
        try:
            self.secagg.reveal(self._unmask_should_stop)
            return "revealed"
        except SecAggLeft as e:
            return f"left: {e.reason}"
        except SecAggError as e:
            return f"refused: {e}"[:200]
        except (ProtocolError, ServerUnavailable) as e:
            return f"error: {type(e).__name__}"
        finally:
            self._next_phase("done")

    # -- phases -------------------------------------------------------------

    def _next_phase(self, name: str) -> None:
        """End the running phase (recording its duration) and start `name`."""
        now = self.d.clock.now()
        self.phases[f"{self._running}_s"] = now - self._mark
        self._running, self._mark = name, now

    def _prepare(self) -> tuple[TrainingPlan, np.ndarray, np.ndarray]:
        if not self.a.plan or not self.a.vocab:
            raise TaskFailed("error", "the assignment has no training plan")
        manifest = self.d.plan_manifest(self.a)
        self._check_memory(manifest)
        if not self.d.plans.loaded(self.a):
            for file_ref in self.d.plan_files(self.a, manifest).values():
                self.d.cache.get(file_ref)
        checkpoint = self.d.cache.get(self.a.checkpoint)
        self._next_phase("prepare")
        plan = self._plan = self.d.plans.acquire(self.a, lambda: self.d.lay_out_plan(self.a))
        layout, initial, _ = load_checkpoint(checkpoint)
        if layout != plan.layout:
            raise TaskFailed("error", "the checkpoint's weight layout is not the plan's")
        windows = local_windows(plan, self.texts)
        self._next_phase({"eval": "eval", "personalize": "personalize"}.get(self.a.task, "train"))
        return plan, initial, windows

    def _check_memory(self, manifest: Manifest) -> None:
        epochs = int(self.a.hyperparameters.get("epochs", 1))
        need = estimated_task_memory_mb(manifest, sum(len(split_sentences(t)) for t in self.texts),
                                        epochs)
        free = self.d.conditions.read().free_memory_mb
        budget = self.d.settings.task_memory_budget_mb
        if need > free or (budget is not None and need > budget):
            raise TaskFailed("out_of_memory", f"needs ~{need:.0f} MiB; {free} MiB free, "
                                              f"budget {budget if budget is not None else '-'} MiB")

    def _train(self, plan: TrainingPlan, initial: np.ndarray, windows: np.ndarray) -> Outcome:
        hp = self.a.hyperparameters
        update = train_locally(plan, initial, windows, Hyperparameters(
            float(hp["learning_rate"]), int(hp["epochs"]), int(hp["batch_size"]), int(hp["seed"]),
            hp.get("max_examples")), should_stop=self.should_stop)
        self.batches = int(update.metrics["batches"])
        self._finish_compute(update.metrics["train_seconds"])
        self.examples = update.num_examples
        if update.num_examples < 1:
            raise TaskFailed("error", "no training windows in the local examples")
        masker = None
        if self.secagg is not None:
            self._next_phase("secagg_wait")
            masker = self.secagg.masker()
        self._next_phase("upload")
        answer = self.d.client.upload(self.a, update.delta, update.num_examples, update.metrics, masker)
        self._next_phase("done")
        return answer

    def _evaluate(self, plan: TrainingPlan, initial: np.ndarray, windows: np.ndarray) -> Outcome:
        plan.set_weights(initial)
        hits, loss_sum = Hits(), 0.0
        started = time.monotonic()
        for start in range(0, len(windows), plan.batch_size):
            reason = self.should_stop()
            if reason:
                raise Interrupted(reason, self.batches)
            w = windows[start:start + plan.batch_size]
            logits = plan.infer(w[:, :-1])
            hits = hits + count_hits(logits, w[:, 1:])
            loss_sum += masked_nll_sum(logits, w[:, 1:])
            self.batches += 1
        self._finish_compute(time.monotonic() - started)
        self.examples = hits.positions
        self._next_phase("upload")
        answer = self.d.client.report_eval(self.a, hits.top1, hits.top3, hits.positions, loss_sum)
        self._next_phase("done")
        return answer

    def _personalize(self, plan: TrainingPlan, initial: np.ndarray, windows: np.ndarray) -> Outcome:
        """A personalization evaluation (contract.tasks.personal.evaluate): only the counts leave the phone."""
        from contract.tasks.personal import PersonalSpec, evaluate

        if self.a.personalization is None:
            raise TaskFailed("error", "a personalize task needs its personalization spec")
        spec = PersonalSpec.from_json(self.a.personalization)
        started = time.monotonic()
        report = evaluate(plan, initial, windows, spec, int(self.a.hyperparameters.get("seed", 0)))
        reason = self.should_stop()
        if reason:
            raise Interrupted(reason, 0)
        self._finish_compute(time.monotonic() - started)
        self.examples = report.global_hits.positions
        masker = None
        if self.secagg is not None:      # the counts travel masked, like a training update
            self._next_phase("secagg_wait")
            masker = self.secagg.masker()
        self._next_phase("upload")
        answer = self.d.client.report_personal(self.a, report, masker)
        self._next_phase("done")
        return answer

    def _discover(self) -> Outcome:
        if self.a.vocab is None or self.a.discovery is None:
            raise TaskFailed("error", "a discover task needs a vocabulary and a level")
        vocab = Vocabulary.load(self.d.cache.get(self.a.vocab))
        self._next_phase("discover")
        ballot = votes(self.a.discovery, self.texts, vocab)
        reason = self.should_stop()
        if reason:
            raise Interrupted(reason, 0)
        self._next_phase("upload")
        answer = self.d.client.report_discovery(self.a, ballot)
        self._next_phase("done")
        return answer

    def _unmask_should_stop(self) -> str | None:
        """The training conditions, and a grace period after the report deadline for the unmasking."""
        reasons = self.d.policy.blockers(self.d.conditions.read())
        if self.d.clock.now() > self.unmask_until:
            reasons.append("out_of_time")
        return reasons[0] if reasons else None

    def should_stop(self) -> str | None:
        """Checked before every batch and once after the last: the first reason to stop, or None."""
        reasons = self.d.policy.blockers(self.d.conditions.read())
        if self.d.clock.now() > self.deadline:
            reasons.append("out_of_time")
        return reasons[0] if reasons else None

    def _finish_compute(self, real_seconds: float) -> None:
        """The plan's work is done: give it back, then check the conditions once more.

        The plan is not touched after this; a later task starts by setting its
        weights.
        """
        self._release_plan(healthy=True, compute_s=real_seconds)
        reason = self.should_stop()
        if reason:
            raise Interrupted(reason, self.batches)

    def _release_plan(self, healthy: bool, compute_s: float = 0.0) -> None:
        """Give the plan back to the device's `PlanHost` (once; later calls do nothing)."""
        plan, self._plan = self._plan, None
        if plan is not None:
            self.d.plans.release(self.a, plan, healthy=healthy, compute_s=compute_s)

    # -- outcomes -----------------------------------------------------------

    def _fail(self, outcome: str, reason: str, detail: str) -> str:
        self._next_phase("report_failure")
        try:
            self.d.client.report_failure(self.a, reason)     # the code only: `detail` stays in the log
            reported = True
        except (ServerUnavailable, ProtocolError):
            reported = False   # the round's deadline counts us as dropped anyway
        self._log(outcome, reason=reason, detail=detail[:300], reported=reported)
        return outcome

    def _log(self, outcome: str, **detail: object) -> None:
        d = self.d
        d.opstats.log(self.started, "task", outcome, task=self.a.task, session=self.a.session_id,
                      round=self.a.round, batches=self.batches,
                      examples=getattr(self, "examples", 0),
                      bytes_out=d.transport.bytes_sent - self._bytes[0],
                      bytes_in=d.transport.bytes_received - self._bytes[1],
                      **{k: round(v, 4) for k, v in self.phases.items()}, **detail)


def masked_nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed cross-entropy of the non-pad targets (the numerator of the eval's mean loss)."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float((nll * (targets != PAD_ID)).sum())
