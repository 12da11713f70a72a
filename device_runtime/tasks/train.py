"""The train kind: FedAvg's client step on the plan, and the update up.

The phone trains the round's weights on its stored text with the task's
hyperparameters (device_runtime.training: interruptible before every batch)
and uploads the weight delta, encoded as the round's update spec says
(contract.update.pipeline, in `ServerClient.upload`); under secure
aggregation it is masked, and neither its weight nor its metrics go up in
the clear.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from device_runtime.errors import TaskFailed
from device_runtime.training import Hyperparameters, train_locally

if TYPE_CHECKING:
    from device_runtime.task import Task
    from device_runtime.tasks import PlanWork, Send


class Train:
    name = "train"

    def compute(self, task: "Task", work: "PlanWork") -> "Send":
        task.next_phase("train")
        hp = task.assignment.hyperparameters
        update = train_locally(work.plan, work.initial, work.windows, Hyperparameters(
            float(hp["learning_rate"]), int(hp["epochs"]), int(hp["batch_size"]), int(hp["seed"]),
            hp.get("max_examples")), should_stop=task.should_stop)
        task.batches = int(update.metrics["batches"])
        task.finish_compute(update.metrics["train_seconds"])
        task.examples = update.num_examples
        if update.num_examples < 1:
            raise TaskFailed("error", "no training windows in the local examples")
        client, assignment = task.device.client, task.assignment
        return lambda masker: client.upload(assignment, update.delta, update.num_examples, update.metrics, masker)


TRAIN = Train()
