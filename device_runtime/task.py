"""One assigned task, from its artifacts to its report: what every task kind shares.

What a kind does with its assignment — train, evaluate, personalize,
discover — is its module's in device_runtime.tasks; this module runs the
rest, the same for every kind. Phases, each timed into the participation
log so `status` and the benchmark show where a task's time goes:

* secagg_share (secure aggregation, for a kind whose report may travel
  masked: contract.tasks.KINDS): advertise keys, send shares
  (device_runtime.secagg; then secagg_wait before the upload and
  secagg_unmask after it);
* download: for a kind that uses the plan, the plan's manifest, then (if the
  budgets allow) the plan, its vocabulary and the round's checkpoint, each
  verified by sha256 and cached (a plan is fetched once per plan, a
  checkpoint once per round);
* prepare: LiteRT loads the plan (kept loaded while the plan is the same),
  the checkpoint is read and the stored text tokenized with the plan's
  vocabulary;
* the kind's own phase: `train`, `eval`, `personalize` or `discover`
  (device_runtime.tasks);
* upload: the kind's report (the delta, the counts, the votes).

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

Each of those is a `DeviceError` (device_runtime.errors), which says the
reason code to report and the outcome to log. Nothing of an unfinished task
survives: the plan's weights are reset, and only a failure reason code goes
up (the technical detail stays in the participation log on the phone).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from contract.artifacts.manifest import Manifest
from contract.model.text import split_sentences
from contract.model.weights import load_checkpoint
from contract.protocol.wire import Outcome
from contract.tasks import KINDS as WIRE_KINDS
from device_runtime.client import Assignment
from device_runtime.errors import DeviceError, SecAggRefused, TaskFailed, device_errors
from device_runtime.secagg import SecAggLeft, SecureAggregation
from device_runtime.tasks import KINDS, PlanWork
from device_runtime.training import Interrupted, local_windows
from tflite_export.reader import TrainingPlan

if TYPE_CHECKING:
    from device_runtime.runtime import Device

UNMASK_GRACE_S = 900.0     # how long after its report deadline a phone stays for the unmasking


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
    """One assignment, run by `device` on its stored `texts`; its kind's work is device_runtime.tasks'."""

    def __init__(self, device: "Device", assignment: Assignment, texts: list[str]):
        self.device, self.assignment, self.texts = device, assignment, texts
        self.kind = KINDS[assignment.task]
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
            if secure and WIRE_KINDS[assignment.task].maskable else None

    def run(self) -> str:
        """Run the task and report it; returns the outcome logged (see the module docstring)."""
        try:
            with device_errors():
                answer = self._work()
        except DeviceError as e:
            if isinstance(e, Interrupted):
                self.batches = e.batches_done
            self._release_plan(healthy=e.plan_reusable)  # LiteRT may have failed half-way: reload it next time
            return self._fail(e.outcome, e.reason, e.detail)
        finally:
            self._release_plan(healthy=True)
        outcome = "completed" if answer.status == "accepted" else "discarded"
        detail = {"reason": answer.reason} if answer.reason else {}
        if self.secagg is not None and answer.status == "accepted":
            detail["secagg"] = self._reveal()
        self._log(outcome, **detail)
        return outcome

    def _work(self) -> Outcome:
        """The phases up to the server's answer to the report: secure aggregation's around the kind's."""
        if self.secagg is not None:     # keys and shares first: short phases, before the long download
            self.next_phase("secagg_share")
            self.secagg.advertise()
            self.secagg.share()
            self.next_phase("download")
        work = self._prepare() if WIRE_KINDS[self.assignment.task].uses_plan else None
        send = self.kind.compute(self, work)
        masker = None
        if self.secagg is not None:      # the report travels masked
            self.next_phase("secagg_wait")
            masker = self.secagg.masker()
        self.next_phase("upload")
        answer = send(masker)
        self.next_phase("done")
        return answer

    def _reveal(self) -> str:
        """After a masked upload: take part in the unmasking; how that went (the upload stands)."""
        self.next_phase("secagg_unmask")
        try:
            self.secagg.reveal(self._unmask_should_stop)
            return "revealed"
        except SecAggLeft as e:
            return f"left: {e.reason}"
        except SecAggRefused as e:
            return f"refused: {e}"[:200]
        except DeviceError as e:          # the server refusing or unreachable
            return f"error: {e.name}"
        finally:
            self.next_phase("done")

    # -- phases -------------------------------------------------------------

    def next_phase(self, name: str) -> None:
        """End the running phase (recording its duration) and start `name`."""
        now = self.device.clock.now()
        self.phases[f"{self._running}_s"] = now - self._mark
        self._running, self._mark = name, now

    def _prepare(self) -> PlanWork:
        """Download (budgets allowing) and load the plan, read the checkpoint, tokenize the text."""
        device, assignment = self.device, self.assignment
        if not assignment.plan or not assignment.vocab:
            raise TaskFailed("error", "the assignment has no training plan")
        manifest = device.plan_manifest(assignment)
        self._check_memory(manifest)
        if not device.plans.loaded(assignment):
            for file_ref in device.plan_files(assignment, manifest).values():
                device.cache.get(file_ref)
        checkpoint = device.cache.get(assignment.checkpoint)
        self.next_phase("prepare")
        plan = self._plan = device.plans.acquire(assignment, lambda: device.lay_out_plan(assignment))
        layout, initial, _ = load_checkpoint(checkpoint)
        if layout != plan.layout:
            raise TaskFailed("error", "the checkpoint's weight layout is not the plan's")
        return PlanWork(plan, initial, local_windows(plan, self.texts))

    def _check_memory(self, manifest: Manifest) -> None:
        epochs = int(self.assignment.hyperparameters.get("epochs", 1))
        need = estimated_task_memory_mb(manifest, sum(len(split_sentences(t)) for t in self.texts),
                                        epochs)
        free = self.device.conditions.read().free_memory_mb
        budget = self.device.settings.task_memory_budget_mb
        if need > free or (budget is not None and need > budget):
            raise TaskFailed("out_of_memory", f"needs ~{need:.0f} MiB; {free} MiB free, "
                                              f"budget {budget if budget is not None else '-'} MiB")

    def _unmask_should_stop(self) -> str | None:
        """The training conditions, and a grace period after the report deadline for the unmasking."""
        reasons = self.device.policy.blockers(self.device.conditions.read())
        if self.device.clock.now() > self.unmask_until:
            reasons.append("out_of_time")
        return reasons[0] if reasons else None

    def should_stop(self) -> str | None:
        """Checked before every batch and once after the last: the first reason to stop, or None."""
        reasons = self.device.policy.blockers(self.device.conditions.read())
        if self.device.clock.now() > self.deadline:
            reasons.append("out_of_time")
        return reasons[0] if reasons else None

    def interrupt_if_stopped(self, batches_done: int) -> None:
        """Raise `Interrupted` if the task should stop now (`should_stop`)."""
        reason = self.should_stop()
        if reason:
            raise Interrupted(reason, batches_done)

    def finish_compute(self, real_seconds: float) -> None:
        """The plan's work is done: give it back, then check the conditions once more.

        The plan is not touched after this; a later task starts by setting its
        weights.
        """
        self._release_plan(healthy=True, compute_s=real_seconds)
        self.interrupt_if_stopped(self.batches)

    def _release_plan(self, healthy: bool, compute_s: float = 0.0) -> None:
        """Give the plan back to the device's `PlanHost` (once; later calls do nothing)."""
        plan, self._plan = self._plan, None
        if plan is not None:
            self.device.plans.release(self.assignment, plan, healthy=healthy, compute_s=compute_s)

    # -- outcomes -----------------------------------------------------------

    def _fail(self, outcome: str, reason: str, detail: str) -> str:
        self.next_phase("report_failure")
        try:
            self.device.client.report_failure(self.assignment, reason)   # the code only: `detail` stays in the log
            reported = True
        except DeviceError:
            reported = False   # the round's deadline counts us as dropped anyway
        self._log(outcome, reason=reason, detail=detail[:300], reported=reported)
        return outcome

    def _log(self, outcome: str, **detail: object) -> None:
        device, assignment = self.device, self.assignment
        device.opstats.log(self.started, "task", outcome, task=assignment.task, session=assignment.session_id,
                           round=assignment.round, batches=self.batches, examples=self.examples,
                           bytes_out=device.transport.bytes_sent - self._bytes[0],
                           bytes_in=device.transport.bytes_received - self._bytes[1],
                           **{k: round(v, 4) for k, v in self.phases.items()}, **detail)
