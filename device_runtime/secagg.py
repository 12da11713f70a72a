"""The phone's part in secure aggregation, inside one training task (server.secagg runs the phases).

The task goes: advertise its keys → wait for its neighbours and send them
its shares → download and prepare → train → wait for the masking phase,
read its inbox, upload the masked update → wait for the unmasking phase and
reveal the shares asked for. Keys and shares come before the download: they
are small and their windows short, and the download and training fit in
the masking phase, which lasts until the report deadline. Between phases the phone waits as long as the
server's status says, checking its training conditions and the task's time
budget before each poll: a failing condition ends its part like any
interruption (the round carries on without it). The cryptography and the
rules (never both shares of one neighbour) are contract.secagg.masking.DeviceSecAgg's;
its secrets live in memory for this task only. What DeviceSecAgg refuses
(`SecAggError`) comes out of here as the phone's `SecAggRefused`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from contract.secagg.masking import DeviceSecAgg, SecAggError
from contract.secagg.messages import PHASES, SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
from device_runtime.errors import SecAggRefused, TaskFailed

if TYPE_CHECKING:
    from device_runtime.client import Assignment, ServerClient
    from contract.clock import Clock

ORDER = {phase: i for i, phase in enumerate(PHASES[:5])}   # keys, shares, masking, unmasking, done


class SecAggLeft(TaskFailed):
    """The phone's part ended before its phase: `reason` is a failure reason code (or "excluded")."""


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """What DeviceSecAgg refuses (a message that does not check out, a rule to keep) as SecAggRefused."""
    try:
        yield
    except SecAggError as e:
        raise SecAggRefused(str(e)) from e


class SecureAggregation:
    def __init__(self, client: "ServerClient", assignment: "Assignment", clock: "Clock",
                 should_stop: Callable[[], str | None]):
        self.client, self.assignment, self.clock, self.should_stop = client, assignment, clock, should_stop
        self.secrets = DeviceSecAgg(assignment.update.fingerprint.encode())
        self.polls = 0

    def advertise(self) -> None:
        self.client.secagg_send(self.assignment, "keys", SecAggKeys(self.secrets.advertise()))

    def share(self) -> None:
        status = self._wait_for("shares")
        with _refusals():
            shares = self.secrets.share(status.node, status.threshold, list(status.neighbours))
        self.client.secagg_send(self.assignment, "shares", SecAggShares(shares))

    def masker(self) -> Callable[[np.ndarray], np.ndarray]:
        """Once the masking phase starts: read the neighbours' shares; the function that masks."""
        status = self._wait_for("masking")
        with _refusals():
            self.secrets.receive(status.inbox)
        return self.secrets.mask

    def reveal(self, should_stop: Callable[[], str | None]) -> None:
        """Reveal what the server asks for; SecAggRefused if that would break a rule (then nothing goes).
        `should_stop` replaces the task's: the unmasking comes after the report deadline."""
        self.should_stop = should_stop
        status = self._wait_for("unmasking")
        if status.done:
            return
        with _refusals():
            shares = self.secrets.reveal(list(status.survivors), list(status.dropped))
        self.client.secagg_send(self.assignment, "reveal", SecAggReveal(shares))

    def _wait_for(self, phase: str) -> SecAggStatus:
        while True:
            reason = self.should_stop()
            if reason:
                raise SecAggLeft(reason, f"waiting for the {phase} phase")
            status = self.client.secagg_status(self.assignment)
            self.polls += 1
            if status.phase in ("failed", "excluded", "done") and phase != status.phase:
                raise SecAggLeft("cancelled", f"the round's secure aggregation is {status.phase}")
            if ORDER[status.phase] > ORDER[phase]:
                raise SecAggLeft("out_of_time", f"the {phase} phase is over ({status.phase} now)")
            if status.phase == phase and (not status.done or phase == "unmasking"):
                return status
            self.clock.sleep(status.wait_s or 1.0)
