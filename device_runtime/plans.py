"""Where a task gets its loaded training plan (a LiteRT interpreter), and where it goes back.

A phone keeps one plan loaded while the rounds it is assigned use it
(`ResidentPlan`). The runtime asks for the plan through the `PlanHost`
interface only, so a host that lends interpreters among many emulated phones
(`emulation.phones.PooledPlans`) can stand in without the runtime knowing:

* `loaded(assignment)`: whether the plan's files need not be verified again;
* `acquire(assignment, lay_out)`: the loaded plan; `lay_out()` puts the
  verified plan files in a directory and returns its manifest path;
* `release(assignment, plan, healthy, compute_s)`: the task no longer needs
  the plan. `healthy=False` means LiteRT may have failed half-way, so the
  interpreter must not be reused; `compute_s` is how long the plan worked.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from device_runtime.client import Assignment
from tflite_export.reader import TrainingPlan, load_plan


def plan_key(assignment: Assignment) -> str:
    """A plan is known by its manifest's sha256."""
    return assignment.plan["manifest"]["sha256"]


class PlanHost(Protocol):
    def loaded(self, assignment: Assignment) -> bool: ...

    def acquire(self, assignment: Assignment, lay_out: Callable[[], Path]) -> TrainingPlan: ...

    def release(self, assignment: Assignment, plan: TrainingPlan, *, healthy: bool,
                compute_s: float) -> None: ...


class ResidentPlan:
    """One plan stays loaded between tasks while its manifest is the same (a phone's own)."""

    def __init__(self, num_threads: int | None = 1):
        self.num_threads = num_threads
        self._loaded: tuple[str, TrainingPlan] | None = None

    def loaded(self, assignment: Assignment) -> bool:
        return self._loaded is not None and self._loaded[0] == plan_key(assignment)

    def acquire(self, assignment: Assignment, lay_out: Callable[[], Path]) -> TrainingPlan:
        key = plan_key(assignment)
        if not self.loaded(assignment):
            self._loaded = None
            self._loaded = (key, load_plan(lay_out(), num_threads=self.num_threads))
        return self._loaded[1]

    def release(self, assignment: Assignment, plan: TrainingPlan, *, healthy: bool,
                compute_s: float) -> None:
        if not healthy:
            self._loaded = None   # reload it next time
