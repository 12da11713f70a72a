"""The eval kind: how well the round's weights predict the user's stored text, as counts.

The plan infers every window once; the phone counts top-1 and top-3 hits as
contract.model.metrics defines them and sums the loss of the non-pad
targets (the server divides the sums of all phones). Only the counts go up.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from contract.model.metrics import Hits, count_hits
from contract.model.text import PAD_ID

if TYPE_CHECKING:
    from device_runtime.task import Task
    from device_runtime.tasks import PlanWork, Send


class Evaluate:
    name = "eval"

    def compute(self, task: "Task", work: "PlanWork") -> "Send":
        task.next_phase("eval")
        plan, windows = work.plan, work.windows
        plan.set_weights(work.initial)
        hits, loss_sum = Hits(), 0.0
        started = time.monotonic()
        for start in range(0, len(windows), plan.batch_size):
            task.interrupt_if_stopped(task.batches)
            w = windows[start:start + plan.batch_size]
            logits = plan.infer(w[:, :-1])
            hits = hits + count_hits(logits, w[:, 1:])
            loss_sum += masked_nll_sum(logits, w[:, 1:])
            task.batches += 1
        task.finish_compute(time.monotonic() - started)
        task.examples = hits.positions
        client, assignment = task.device.client, task.assignment
        return lambda masker: client.report_eval(assignment, hits.top1, hits.top3, hits.positions, loss_sum)


def masked_nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed cross-entropy of the non-pad targets (the numerator of the eval's mean loss)."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float((nll * (targets != PAD_ID)).sum())


EVAL = Evaluate()
