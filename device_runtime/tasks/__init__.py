"""What each task kind does with its assignment on the phone: one module per kind.

`contract.tasks.KINDS` names the kinds and says what their two halves share:
the report's endpoint, whether it may travel masked under secure
aggregation (`maskable`), whether the phone needs the training plan and the
round's checkpoint (`uses_plan`). `KINDS` here maps each name to the phone's
half, an object with a `compute` method:

* `train`       — FedAvg's client step on the plan; the encoded delta goes up;
* `eval`        — the plan's top-1/top-3 hits and summed loss on the stored text;
* `personalize` — a personal model made and judged on the user's later text;
  only the counts go up (masked under secure aggregation);
* `discover`    — votes for new words at one level of a discovery pass.

device_runtime.task runs what every kind shares — the phases and their
timing, the time and memory budgets, the download and preparation of the
plan for kinds that use it, secure aggregation's phases around the kind's
work, failure reporting and the participation log — and asks the kind only
for its work: `compute` starts the kind's own phase, does the work
(checking the task's conditions as it goes) and returns how to send its
report, which the task calls once the upload may start.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from contract.tasks import KINDS as WIRE_KINDS
from device_runtime.tasks.discover import DISCOVER
from device_runtime.tasks.eval import EVAL
from device_runtime.tasks.personalize import PERSONALIZE
from device_runtime.tasks.train import TRAIN

if TYPE_CHECKING:
    from contract.protocol.wire import Outcome
    from device_runtime.task import Task
    from tflite_export.reader import TrainingPlan

Masker = Callable[[np.ndarray], np.ndarray]           # secure aggregation's mask (device_runtime.secagg)
Send = Callable[["Masker | None"], "Outcome"]         # uploads a kind's report, masked if given a masker


class PlanWork(NamedTuple):
    """What a kind that uses the plan works on: the loaded plan, the round's weights, the user's text."""

    plan: "TrainingPlan"
    initial: np.ndarray      # the round's checkpoint, flat float32 in the plan's layout
    windows: np.ndarray      # the stored text as token windows [n, seq_len + 1], the plan's vocabulary


class TaskKind(Protocol):
    """The phone's half of one task kind."""

    name: str                # its contract.tasks.KINDS name (Assignment.task)

    def compute(self, task: "Task", work: PlanWork | None) -> Send:
        """Do the kind's work for `task` (`work` is None for a kind that does not use the plan); how to
        send the report. Raises a DeviceError (device_runtime.errors) if the task cannot go on."""
        ...


KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (TRAIN, EVAL, PERSONALIZE, DISCOVER)}
assert set(KINDS) == set(WIRE_KINDS), "every task kind the wire knows has its phone half"
