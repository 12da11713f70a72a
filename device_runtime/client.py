"""The device's side of the Nightjar protocol (see the server's /openapi.json).

`ServerClient` speaks the protocol: register, check in, report an update, an
evaluation or a failure, find the published app model. The server's error
answers, and answers that do not parse, come out of it as `ServerRefused`
(device_runtime.errors; the contract's `ProtocolError` inside). `ArtifactCache`
keeps downloaded artifacts by content hash and verifies every byte it hands
out: a download whose sha256 is not the one the server named is thrown away
and fetched again (a bounded number of times). The cache is bounded in bytes,
least recently used first out, because every round brings a new checkpoint
and a phone's storage is not the server's. Only what the protocol names goes
up: conditions (no text), the encoded weight delta, counts and metrics.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.protocol.errors import ProtocolError
from contract.update.pipeline import UpdatePipeline
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
from contract.protocol.wire import (Assignment, Conditions, DiscoveryBallot, EvalReport, FailureReport, Nonce, Outcome, Registration,
                           Rejection)
from device_runtime.errors import DeviceError, ServerRefused
from device_runtime.transport import Transport

if TYPE_CHECKING:
    from device_runtime.enrollment import Enrollment

__all__ = ["ArtifactCache", "Assignment", "CorruptDownload", "Rejection", "ServerClient", "ServerRefused"]


class CorruptDownload(DeviceError):
    """An artifact kept arriving with a different sha256 than the server named."""


def _answers(method: Callable) -> Callable:
    """`method` with the contract's `ProtocolError` — an error answer, or an answer that does not parse
    against its schema — raised as the phone's `ServerRefused`: the one place it enters the phone."""
    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ProtocolError as e:
            raise ServerRefused(e) from e
    return checked


def _json(resp) -> Any:
    """The answer's JSON, or the server's error as a `ProtocolError` (its code, message, status)."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        body = body if isinstance(body, dict) else {}
        raise ProtocolError(str(body.get("error", "http_error")), str(body.get("message", resp.text[:200])),
                            status=resp.status_code)
    if body is None:
        raise ProtocolError("malformed_json", f"the server's answer is not JSON ({resp.text[:80]!r})",
                            status=resp.status_code)
    return body


class ServerClient:
    """The protocol (see the server's /openapi.json), with every answer checked against its schema."""

    def __init__(self, transport: Transport):
        self.transport = transport

    @_answers
    def register(self, population: str, enrollment: "Enrollment") -> tuple[str, str]:
        """Enroll: a nonce, the attestation service's statement for it, then the registration."""
        nonce = Nonce.from_json(_json(self.transport.request("POST", "/v1/enrollment/nonces",
                                                     json={"population": population})))
        attestation = enrollment.attester.attest(population, nonce.nonce)
        registration = Registration.from_json(_json(self.transport.request(
            "POST", "/v1/devices", json={"population": population, "app_credential": enrollment.app_credential,
                                         "attestation": attestation.to_json()})))
        return registration.device_id, registration.secret

    def authenticate(self, device_id: str, secret: str) -> None:
        self.transport.auth = f"Bearer {device_id}:{secret}"

    @_answers
    def checkin(self, population: str, conditions: Conditions) -> Assignment | Rejection:
        body = _json(self.transport.request("POST", "/v1/checkin",
                                    json={"population": population, "conditions": conditions.to_json()}))
        if isinstance(body, dict) and "assignment" in body:
            return Assignment.from_json(body["assignment"])
        return Rejection.from_json(body.get("rejection") if isinstance(body, dict) else None)

    @_answers
    def upload(self, assignment: Assignment, delta: np.ndarray, num_examples: int,
               metrics: dict[str, float], masker: Callable[[np.ndarray], np.ndarray] | None = None) -> Outcome:
        """Encode the update as the round's spec says (contract.update.pipeline) and POST it. Under secure
        aggregation `masker` masks it, and neither the weight nor the metrics go up in the clear."""
        if assignment.update is None:
            raise ProtocolError("invalid_field", "the training assignment has no update spec")
        encoded = UpdatePipeline(assignment.update).encode(delta, num_examples,
                                                           int(assignment.hyperparameters["seed"]), masker)
        params: dict = {"model_version": assignment.model_version}
        if masker is None:
            params.update(num_examples=encoded.weight,
                          metrics=json.dumps({k: float(v) for k, v in metrics.items()}))
        return Outcome.from_json(_json(self.transport.request(
            "POST", assignment.report_url, params=params, data=encoded.body,
            headers={"Content-Type": "application/octet-stream"})))

    # -- secure aggregation's phases (device_runtime.secagg) --

    @_answers
    def secagg_status(self, assignment: Assignment) -> SecAggStatus:
        return SecAggStatus.from_json(_json(self.transport.request("GET", f"/v1/sessions/{assignment.session_id}/secagg")))

    @_answers
    def secagg_send(self, assignment: Assignment, phase: str, message: SecAggKeys | SecAggShares | SecAggReveal) -> None:
        """POST the answer to a phase: "keys", "shares" or "reveal"."""
        _json(self.transport.request("POST", f"/v1/sessions/{assignment.session_id}/secagg/{phase}",
                             json=message.to_json()))

    @_answers
    def report_failure(self, assignment: Assignment, reason: str) -> Outcome:
        """A reason code only: the protocol carries no free text from a device."""
        return Outcome.from_json(_json(self.transport.request("POST", assignment.failure_url,
                                                      json=FailureReport(reason).to_json())))

    @_answers
    def report_eval(self, assignment: Assignment, top1_hits: int, top3_hits: int,
                    positions: int, loss_sum: float) -> Outcome:
        report = EvalReport(assignment.model_version, top1_hits, top3_hits, positions, loss_sum)
        return Outcome.from_json(_json(self.transport.request("POST", assignment.report_url, json=report.to_json())))

    @_answers
    def report_personal(self, assignment: Assignment, report,
                        masker: Callable[[np.ndarray], np.ndarray] | None = None) -> Outcome:
        """A personalize task's counts (a contract.tasks.personal.PersonalReport): its vector, nothing else;
        under secure aggregation masked by `masker` (contract.secagg.masking.DeviceSecAgg.mask)."""
        from contract.tasks.personal import PersonalEvalReport

        counts = np.asarray(report.vector(), np.int64)
        if masker is not None:
            counts = masker(counts.astype(np.uint32))
        body = PersonalEvalReport(assignment.model_version, tuple(int(c) for c in counts), masker is not None)
        return Outcome.from_json(_json(self.transport.request("POST", assignment.report_url, json=body.to_json())))

    @_answers
    def report_discovery(self, assignment: Assignment, votes: list[str]) -> Outcome:
        ballot = DiscoveryBallot(assignment.model_version, tuple(votes))
        return Outcome.from_json(_json(self.transport.request("POST", assignment.report_url, json=ballot.to_json())))

    @_answers
    def app_model(self, population: str) -> dict | None:
        """The latest published app model's description, or None if none is published."""
        from contract.protocol.wire import APP_MODEL

        resp = self.transport.request("GET", f"/v1/populations/{population}/app-model")
        if resp.status_code == 404:
            return None
        return APP_MODEL.parse(_json(resp), "app_model")


class ArtifactCache:
    """Downloaded artifacts by sha256, verified on the way in, at most `max_bytes` kept."""

    def __init__(self, root: str | Path, transport: Transport, max_fetches: int = 3,
                 max_bytes: int = 64 << 20):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.transport = transport
        self.max_fetches = max_fetches
        self.max_bytes = max_bytes
        self.downloaded_bytes = 0

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    @_answers
    def get(self, ref: dict) -> Path:
        """The verified local file for `{"url", "sha256"}`, downloading it if needed."""
        sha = ref["sha256"]
        target = self.path(sha)
        if target.is_file() and _sha256(target.read_bytes()) == sha:
            os.utime(target)
            return target
        for _ in range(self.max_fetches):
            resp = self.transport.request("GET", ref["url"])
            if resp.status_code != 200:
                _json(resp)
                raise ProtocolError("unexpected_status", ref["url"], status=resp.status_code)
            self.downloaded_bytes += len(resp.content)
            if _sha256(resp.content) == sha:
                _atomic_write(target, resp.content)
                self._evict(keep=target)
                return target
        raise CorruptDownload(f"{ref['url']}: {self.max_fetches} downloads, none with sha256 {sha}")

    def _evict(self, keep: Path) -> None:
        """Drop least recently used artifacts until the cache fits `max_bytes` (never `keep`).

        Tolerates files vanishing meanwhile (phones of the fleet emulator share one cache).
        """
        files = []
        for p in self.root.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p != keep and p.suffix != ".tmp":
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files) + keep.stat().st_size
        for _, size, old in sorted(files):
            if total <= self.max_bytes:
                break
            old.unlink(missing_ok=True)
            total -= size

    def materialize(self, files: dict[str, dict], directory: str | Path) -> Path:
        """Lay out cached artifacts under the names a manifest refers to (hard links)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, ref in files.items():
            source, dest = self.get(ref), directory / name
            if not dest.exists() or _sha256(dest.read_bytes()) != ref["sha256"]:
                tmp = dest.with_name(dest.name + ".tmp")
                tmp.unlink(missing_ok=True)
                os.link(source, tmp)
                tmp.replace(dest)
        return directory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
