"""A phone's part in secure aggregation, driven step by step (tests choose who drops out where)."""
from __future__ import annotations

import numpy as np

from contract.secagg.masking import DeviceSecAgg
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
from tests.server_fixtures import DeviceClient, Reply


class SecAggPhone(DeviceClient):
    """DeviceClient plus the secure-aggregation phases, each one call (contract.secagg.masking's crypto)."""

    plaintext: np.ndarray | None = None

    def checkin(self, **conditions) -> Reply:
        reply = super().checkin(**conditions)
        if self.assignment is not None:
            self.secrets = DeviceSecAgg(self.pipeline().round_spec.fingerprint.encode())
        return reply

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sessions/{self.assignment['session_id']}/secagg{suffix}"

    def status(self) -> SecAggStatus:
        reply = self.transport.request("GET", self._path(), headers=self.headers)
        assert reply.status == 200, reply.body
        return SecAggStatus.from_json(reply.body)

    def send(self, phase: str, message) -> Reply:
        return self.transport.request("POST", self._path(f"/{phase}"), headers=self.headers,
                                      json=message.to_json())

    def advertise(self) -> Reply:
        return self.send("keys", SecAggKeys(self.secrets.advertise()))

    def share(self) -> Reply:
        status = self.status()
        assert status.phase == "shares", status
        return self.send("shares", SecAggShares(self.secrets.share(status.node, status.threshold,
                                                                   list(status.neighbours))))

    def masked_upload(self, delta: np.ndarray, num_examples: int = 10) -> Reply:
        status = self.status()
        assert status.phase == "masking", status
        self.secrets.receive(status.inbox)
        pipeline, seed = self.pipeline(), int(self.assignment["hyperparameters"]["seed"])
        self.plaintext = pipeline.plaintext(delta, num_examples, seed)
        body = pipeline.encode(delta, num_examples, seed, masker=self.secrets.mask).body
        return self.upload(body=body, num_examples=None)

    def reveal(self) -> Reply:
        status = self.status()
        assert status.phase == "unmasking", status
        return self.send("reveal", SecAggReveal(self.secrets.reveal(list(status.survivors),
                                                                    list(status.dropped))))
