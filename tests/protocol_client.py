"""An independent Nightjar phone, written from PROTOCOL.md: HTTP with `requests`, nothing from the contract.

What a Kotlin or Swift team would write, in Python: enrollment (4), check-in
(5), artifacts and the checkpoint read by hand (6), a plain update (7) and a
secure round's four phases (10), each request with `Nightjar-Protocol: 1`.
The constructions are tests/protocol_encoding.py, protocol_pipeline.py and
protocol_secagg.py; `predict` is section 8's server step, so a test can say
what the server's next version must be before it asks for it. No import of
`contract/`, `device_runtime/` or `server/`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests import protocol_pipeline as pipe
from tests.protocol_encoding import Spec, b64, canonical, read_safetensors, unb64
from tests.protocol_secagg import Device

PROTOCOL = {"Nightjar-Protocol": "1"}
CONDITIONS = {"charging": True, "idle": True, "unmetered": True, "battery": 0.9, "free_memory_mb": 4096,
              "num_examples": 50, "runtime_version": "1.0.0"}


class Refused(Exception):
    """A 4xx/5xx answer: its status and {error, message}."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class Phone:
    """One enrolled device of `population` (4.1–4.3), and its calls."""

    def __init__(self, base_url: str, population: str, enrollment_file: Path):
        self.base, self.population = base_url.rstrip("/"), population
        self.http = requests.Session()
        material = json.loads(Path(enrollment_file).read_text())
        self._credential, self._issuer = material["app_credential"], Ed25519PrivateKey.from_private_bytes(
            unb64(material["issuer_private_key"]))
        self.authorization: str | None = None
        self.assignment: dict | None = None
        self.secagg: Device | None = None

    def call(self, method: str, path: str, *, json_body=None, data: bytes | None = None, params=None,
             headers: dict | None = None, expect: int = 200):
        headers = {**PROTOCOL, **(headers or {})}
        if self.authorization and "Authorization" not in headers:
            headers["Authorization"] = self.authorization
        r = self.http.request(method, self.base + path, json=json_body, data=data, params=params, headers=headers,
                              timeout=30)
        if r.status_code != expect:
            raise Refused(r.status_code, r.json() if r.headers.get("Content-Type", "").startswith("application/json")
                          else r.text[:200])
        return r.json() if r.headers.get("Content-Type", "").startswith("application/json") else r.content

    def enroll(self, app_id: str = "com.example.keyboard") -> "Phone":
        nonce = self.call("POST", "/v1/enrollment/nonces", json_body={"population": self.population}, expect=201)
        statement = canonical({"population": self.population, "nonce": nonce["nonce"], "verdict": "MEETS_DEVICE_INTEGRITY",
                               "app_id": app_id, "issued_at": time.time(), "version": 1})
        registration = self.call("POST", "/v1/devices", expect=201, json_body={
            "population": self.population, "app_credential": self._credential,
            "attestation": {"statement": b64(statement), "signature": b64(self._issuer.sign(statement))}})
        self.authorization = f"Bearer {registration['device_id']}:{registration['secret']}"
        return self

    def checkin(self, **conditions) -> dict:
        answer = self.call("POST", "/v1/checkin", json_body={"population": self.population,
                                                             "conditions": {**CONDITIONS, **conditions}})
        self.assignment = answer.get("assignment")
        if self.assignment is not None and (self.assignment.get("update") or {}).get("secure_aggregation"):
            self.secagg = Device(self.assignment["update"]["fingerprint"].encode())
        return answer

    def download(self, ref: dict, headers: dict | None = None) -> bytes:
        data = self.call("GET", ref["url"], headers=headers)
        assert hashlib.sha256(data).hexdigest() == ref["sha256"], "an artifact whose bytes are not its hash"
        return data

    def weights(self) -> np.ndarray:
        """The assignment's checkpoint as the flat float32 vector of its layout (6.2)."""
        return flat_weights(self.download(self.assignment["checkpoint"]), self.assignment["layout"])

    # -- a plain round (7) -----------------------------------------------------------------------

    def upload(self, delta: np.ndarray, num_examples: int) -> tuple[dict, np.ndarray, int]:
        """Encode and upload: the outcome, and the units and weight the server must add (section 8)."""
        spec = Spec(self.assignment["update"])
        body, w, _, values, exps = pipe.encode(spec, delta, num_examples, self.assignment["hyperparameters"]["seed"])
        outcome = self.call("POST", self.assignment["report"]["url"], data=body, headers={
            "Content-Type": "application/octet-stream"}, params={
            "model_version": self.assignment["model_version"], "num_examples": w,
            "metrics": json.dumps({"loss": 3.5, "tokens": 120.0})})
        return outcome, pipe.units(spec, values, exps), w

    # -- secure aggregation (10) -------------------------------------------------------------------

    def status(self) -> dict:
        return self.call("GET", f"/v1/sessions/{self.assignment['session_id']}/secagg")

    def wait_for(self, phase: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status["phase"] == phase and (not status["done"] or phase == "unmasking"):
                return status
            assert status["phase"] not in ("failed", "excluded"), status
            time.sleep(min(status["wait_s"] or 0.2, 0.2))
        raise AssertionError(f"no {phase} phase within {timeout_s} s")

    def send(self, phase: str, body: dict) -> dict:
        return self.call("POST", f"/v1/sessions/{self.assignment['session_id']}/secagg/{phase}", json_body=body)

    def advertise(self) -> None:
        self.send("keys", self.secagg.keys())

    def share(self) -> None:
        self.send("shares", self.secagg.shares(self.wait_for("shares")))

    def masked_upload(self, delta: np.ndarray, num_examples: int) -> tuple[dict, list[int]]:
        """Mask and upload: the outcome and the plaintext ring (what the unmasked sum must add up)."""
        self.secagg.receive(self.wait_for("masking"))
        spec = Spec(self.assignment["update"])
        ring, _ = pipe.ring_plaintext(spec, delta, num_examples, self.assignment["hyperparameters"]["seed"])
        body = pipe.masked_body(spec, self.secagg.masked(ring))
        outcome = self.call("POST", self.assignment["report"]["url"], data=body,
                            headers={"Content-Type": "application/octet-stream"},
                            params={"model_version": self.assignment["model_version"]})
        return outcome, ring

    def reveal(self) -> None:
        self.send("reveal", self.secagg.reveal(self.wait_for("unmasking")))


def flat_weights(checkpoint: bytes, layout: list[dict]) -> np.ndarray:
    """A checkpoint's tensors, in layout order, each flattened row-major (6.2)."""
    metadata, tensors = read_safetensors(checkpoint)
    assert json.loads(metadata["layout"]) == layout, "the checkpoint's layout is not the assignment's"
    parts = []
    for entry in layout:
        dtype, shape, data = tensors[entry["name"]]
        assert dtype == "F32" and shape == entry["shape"], entry
        parts.append(np.frombuffer(data, "<f4"))
    return np.concatenate(parts)


def predict(weights: np.ndarray, mean: np.ndarray, optimizer: str, lr: float, momentum: float,
            accumulator: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Section 8: the server's step from `weights` with the round's mean (sgd, sgdm), all in float32."""
    g = -np.asarray(mean, np.float32)
    lr32 = np.float32(lr)
    if optimizer == "sgd":
        return (weights - lr32 * g).astype(np.float32), None
    if optimizer != "sgdm":
        raise ValueError(f"this client predicts sgd and sgdm, not {optimizer}")
    a = np.float32(momentum) * (accumulator if accumulator is not None else np.zeros_like(g)) + g
    return (weights - lr32 * a).astype(np.float32), a
