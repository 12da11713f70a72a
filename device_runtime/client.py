"""The device's side of the Nightjar protocol (see the server's /openapi.json).

`ServerClient` speaks the protocol: register, check in, report an update, an
evaluation or a failure, find the published app model. `ArtifactCache` keeps
downloaded artifacts by content hash and verifies every byte it hands out: a
download whose sha256 is not the one the server named is thrown away and
fetched again (a bounded number of times). The cache is bounded in bytes,
least recently used first out, because every round brings a new checkpoint
and a phone's storage is not the server's. Only what the protocol names goes
up: conditions (no text), a weight delta, counts and metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_tensors

from device_runtime.transport import Transport


class ProtocolError(Exception):
    """The server refused a request (4xx) or answered something unexpected."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class CorruptDownload(Exception):
    """An artifact kept arriving with a different sha256 than the server named."""


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    retry_min_s: float
    retry_max_s: float


@dataclasses.dataclass(frozen=True)
class Assignment:
    raw: dict   # the server's assignment JSON (session, task, artifacts, hyperparameters, ...)

    @property
    def session_id(self) -> str:
        return self.raw["session_id"]

    @property
    def task(self) -> str:
        return self.raw["task"]

    @property
    def model_version(self) -> int:
        return int(self.raw["model_version"])

    @property
    def hyperparameters(self) -> dict:
        return self.raw["hyperparameters"]

    @property
    def report_deadline_in_s(self) -> float:
        return float(self.raw.get("report_deadline_in_s", 0.0))


def _json(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code >= 400:
        raise ProtocolError(resp.status_code, str(body.get("error", "http_error")),
                            str(body.get("message", resp.text[:200])))
    return body


class ServerClient:
    def __init__(self, transport: Transport):
        self.t = transport

    def register(self) -> tuple[str, str]:
        body = _json(self.t.request("POST", "/v1/devices", json={}))
        return body["device_id"], body["secret"]

    def authenticate(self, device_id: str, secret: str) -> None:
        self.t.auth = f"Bearer {device_id}:{secret}"

    def checkin(self, population: str, conditions: dict[str, Any]) -> Assignment | Rejection:
        body = _json(self.t.request("POST", "/v1/checkin",
                                    json={"population": population, "conditions": conditions}))
        if "assignment" in body:
            return Assignment(body["assignment"])
        r = body["rejection"]
        return Rejection(r["reason"], float(r["retry_after_s"]["min"]), float(r["retry_after_s"]["max"]))

    def upload(self, assignment: Assignment, delta: np.ndarray, num_examples: int,
               metrics: dict[str, float]) -> dict:
        """POST the update: safetensors bytes holding exactly the tensor the assignment names."""
        report = assignment.raw["report"]
        payload = save_tensors({report.get("tensor", "delta"): np.ascontiguousarray(delta, np.float32)})
        params = {"model_version": assignment.model_version, "num_examples": num_examples,
                  "metrics": json.dumps({k: float(v) for k, v in metrics.items()})}
        return _json(self.t.request("POST", report["url"], params=params, data=payload,
                                    headers={"Content-Type": "application/octet-stream"}))

    def report_failure(self, assignment: Assignment, reason: str, detail: str | None = None) -> dict:
        body = {"reason": reason, **({"detail": detail[:500]} if detail else {})}
        return _json(self.t.request("POST", assignment.raw["report"]["failure_url"], json=body))

    def report_eval(self, assignment: Assignment, top1_hits: int, top3_hits: int,
                    positions: int, loss_sum: float) -> dict:
        body = {"model_version": assignment.model_version, "top1_hits": top1_hits,
                "top3_hits": top3_hits, "positions": positions, "loss_sum": loss_sum}
        return _json(self.t.request("POST", assignment.raw["report"]["url"], json=body))

    def app_model(self, population: str) -> dict | None:
        """The latest published app model's description, or None if none is published."""
        resp = self.t.request("GET", f"/v1/populations/{population}/app-model")
        if resp.status_code == 404:
            return None
        return _json(resp)


class ArtifactCache:
    """Downloaded artifacts by sha256, verified on the way in, at most `max_bytes` kept."""

    def __init__(self, root: str | Path, transport: Transport, max_fetches: int = 3,
                 max_bytes: int = 64 << 20):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.t = transport
        self.max_fetches = max_fetches
        self.max_bytes = max_bytes
        self.downloaded_bytes = 0

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def get(self, ref: dict) -> Path:
        """The verified local file for `{"url", "sha256"}`, downloading it if needed."""
        sha = ref["sha256"]
        target = self.path(sha)
        if target.is_file() and _sha256(target.read_bytes()) == sha:
            os.utime(target)
            return target
        for _ in range(self.max_fetches):
            resp = self.t.request("GET", ref["url"])
            if resp.status_code != 200:
                _json(resp)
                raise ProtocolError(resp.status_code, "unexpected_status", ref["url"])
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
