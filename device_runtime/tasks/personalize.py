"""The personalize kind: a personalization evaluation, and only its counts up.

The phone makes a personal model from the round's weights on the first part
of its stored text and judges it against the global one on the rest, as
contract.tasks.personal.evaluate defines (the same code the simulation
runs); the personal model is thrown away. Only the counts go up, as one
vector of integers (`PersonalReport.vector`), masked under secure
aggregation like a training update.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from contract.tasks.personal import PersonalSpec, evaluate
from device_runtime.errors import TaskFailed

if TYPE_CHECKING:
    from device_runtime.task import Task
    from device_runtime.tasks import PlanWork, Send


class Personalize:
    name = "personalize"

    def compute(self, task: "Task", work: "PlanWork") -> "Send":
        task.next_phase("personalize")
        assignment = task.assignment
        if assignment.personalization is None:
            raise TaskFailed("error", "a personalize task needs its personalization spec")
        spec = PersonalSpec.from_json(assignment.personalization)
        started = time.monotonic()
        report = evaluate(work.plan, work.initial, work.windows, spec, int(assignment.hyperparameters.get("seed", 0)))
        task.interrupt_if_stopped(0)
        task.finish_compute(time.monotonic() - started)
        task.examples = report.global_hits.positions
        client = task.device.client
        return lambda masker: client.report_personal(assignment, report, masker)


PERSONALIZE = Personalize()
