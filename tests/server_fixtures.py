"""Helpers of the server's tests. TensorFlow-free.

* `write_checkpoint` / `write_plan_dir`: a small initial model and a stand-in
  training plan (`python -m tflite_export plan` writes the real one);
* `FakeExporter`: publishes an app model without TensorFlow;
* `DeviceClient`: one device speaking the protocol at the lowest level, so a
  test can also send what a well-behaved phone never would, over Flask's test
  client (`FlaskTransport`) or real HTTP (`HttpTransport`). Both send the
  protocol version (`PROTOCOL`) on every request, as a phone does; a test
  that speaks another passes its own `Nightjar-Protocol` header.
* `device_test_client(app)`: Flask's test client sending `PROTOCOL` by default.

The real server as a child process is `deploy.server_process.ServerProcess`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import requests

from contract.protocol import version as protocol
from contract.update.pipeline import UpdatePipeline
from contract.update.spec import RoundSpec
from contract.model.weights import WeightLayout, save_checkpoint

# A few hundred floats: fast, but with several tensors like the real layout.
SMALL_LAYOUT = WeightLayout([("embedding", (16, 8)), ("dense/kernel", (8, 16)), ("dense/bias", (16,))])
PROTOCOL = {protocol.HEADER: str(protocol.CURRENT)}      # what every device request carries
ELIGIBLE = {"charging": True, "idle": True, "unmetered": True, "battery": 0.9,
            "free_memory_mb": 4096, "num_examples": 50, "runtime_version": "1.0.0"}


def write_checkpoint(path: Path, layout: WeightLayout = SMALL_LAYOUT, seed: int = 0,
                     model_config: dict | None = None) -> np.ndarray:
    flat = np.random.default_rng(seed).normal(0, 0.1, layout.size).astype(np.float32)
    meta = {"round": 0}
    if model_config is not None:
        meta["model_config"] = model_config
    save_checkpoint(path, layout, flat, meta)
    return flat


def _record(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest_dir(out_dir: Path, name: str, kind: str, model: bytes, layout: WeightLayout,
                       model_version: int = 0, **extra: Any) -> Path:
    """Files shaped like tflite_export's output: <name>.tflite, vocab.json, <name>.manifest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = json.dumps(["<pad>", "<bos>", "<eos>", "<oov>", "thou"]).encode()
    (out_dir / f"{name}.tflite").write_bytes(model)
    (out_dir / "vocab.json").write_bytes(vocab)
    from contract.model.text import Vocabulary

    manifest = {"schema_version": 1, "kind": kind, "model_version": model_version,
                "model_config": {"vocab_size": 5}, "artifact": f"{name}.tflite", "vocab_file": "vocab.json",
                "vocab_sha256": Vocabulary.from_json(vocab.decode()).sha256, "seq_len": 4,
                "weight_layout": layout.to_json(), "signatures": {}, "created_at": "2026-01-01T00:00:00Z",
                "files": {f"{name}.tflite": _record(model), "vocab.json": _record(vocab)}, **extra}
    path = out_dir / f"{name}.manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


def write_plan_dir(out_dir: Path, layout: WeightLayout = SMALL_LAYOUT, batch_size: int = 16) -> Path:
    write_manifest_dir(out_dir, "plan", "training_plan", b"TFL3 fake plan " + bytes(64), layout,
                       batch_size=batch_size)
    return out_dir


class FakeExporter:
    """Writes a tiny app model whose bytes depend on the checkpoint and version."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[Path, Path | None, int]] = []
        self.fail = fail

    def export_app_model(self, checkpoint: Path, vocab: Path | None, model_version: int,
                         out_dir: Path, privacy: dict | None = None) -> Path:
        from contract.model.weights import load_checkpoint

        self.calls.append((checkpoint, vocab, model_version))
        self.privacy = privacy
        if self.fail:
            raise RuntimeError("fake exporter failure")
        layout, flat, _ = load_checkpoint(checkpoint)
        model = b"TFL3 fake app " + flat.tobytes()[:64] + str(model_version).encode()
        return write_manifest_dir(out_dir, "app", "app_model", model, layout, model_version, k=3)


@dataclasses.dataclass
class Reply:
    status: int
    body: Any
    headers: dict
    content: bytes


def device_test_client(app):
    """Flask's test client of `app`, every request carrying `PROTOCOL` unless it names its own."""
    client = app.test_client()
    client.environ_base["HTTP_" + protocol.HEADER.upper().replace("-", "_")] = str(protocol.CURRENT)
    return client


class FlaskTransport:
    def __init__(self, client):
        self.client = client

    def request(self, method: str, path: str, **kwargs) -> Reply:
        kwargs["headers"] = {**PROTOCOL, **(kwargs.get("headers") or {})}
        r = self.client.open(path, method=method, **kwargs)
        return Reply(r.status_code, r.get_json(silent=True), dict(r.headers), r.get_data())


class HttpTransport:
    def __init__(self, base_url: str, timeout_s: float = 30.0):

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, json=None, data=None, headers=None) -> Reply:
        r = self.session.request(method, self.base_url + path, json=json, data=data,
                                 headers={**PROTOCOL, **(headers or {})}, timeout=self.timeout_s)
        try:
            body = r.json()
        except ValueError:
            body = None
        return Reply(r.status_code, body, dict(r.headers), r.content)


def enrollment_for(services, population: str, clock=None):
    """The enrollment material `server init` would write for `population`, as a phone holds it."""
    import time

    from device_runtime.enrollment import Enrollment
    from server.keys import enrollment_material

    path = services.config.enrollment_path(population)
    enrollment_material(path)
    return Enrollment.from_file(path, now=clock.now if clock else time.time)


def enroll(transport, population: str, enrollment, credential: str | None = None, attestation=None) -> Reply:
    """A nonce, then the registration (device_runtime.enrollment); override either half to misbehave."""
    nonce = transport.request("POST", "/v1/enrollment/nonces", json={"population": population})
    assert nonce.status == 201, nonce.body
    attestation = attestation or enrollment.attester.attest(population, nonce.body["nonce"])
    return transport.request("POST", "/v1/devices", json={
        "population": population, "app_credential": credential or enrollment.app_credential,
        "attestation": attestation.to_json()})


class DeviceClient:
    """One device: enroll, check in, report. Raises AssertionError on unexpected statuses."""

    def __init__(self, transport, population: str, enrollment, conditions: dict | None = None):
        self.transport = transport
        self.population = population
        self.conditions = dict(conditions or ELIGIBLE)
        reply = enroll(transport, population, enrollment)
        assert reply.status == 201, reply.body
        self.device_id, self.secret = reply.body["device_id"], reply.body["secret"]
        self.assignment: dict | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.device_id}:{self.secret}"}

    def checkin(self, **conditions: Any) -> Reply:
        reply = self.transport.request("POST", "/v1/checkin", headers=self.headers,
                                       json={"population": self.population,
                                             "conditions": {**self.conditions, **conditions}})
        if reply.status == 200 and "assignment" in reply.body:
            self.assignment = reply.body["assignment"]
        return reply

    def download(self, url: str) -> Reply:
        """An artifact, fetched as this device (unpublished ones go only to assigned devices)."""
        return self.transport.request("GET", url, headers=self.headers)

    def pipeline(self) -> UpdatePipeline:
        """The update pipeline of the current assignment's round."""
        return UpdatePipeline(RoundSpec.from_json(self.assignment["update"]))

    def encode(self, delta: np.ndarray, num_examples: int = 10) -> tuple[bytes, int]:
        """(body, weight) as an honest phone would upload `delta` in this round."""
        encoded = self.pipeline().encode(delta, num_examples, int(self.assignment["hyperparameters"]["seed"]))
        return encoded.body, encoded.weight

    def upload(self, delta: np.ndarray | None = None, num_examples: int = 10,
               model_version: int | None = None, metrics: dict | None = None, body: bytes | None = None,
               session_id: str | None = None, content_type: str = "application/octet-stream") -> Reply:
        """Upload `delta` encoded as the round's spec says (or a raw `body`, claiming `num_examples`)."""
        a = self.assignment or {}
        if body is None:
            body, num_examples = self.encode(delta, num_examples)
        query = {"model_version": a.get("model_version", 0) if model_version is None else model_version}
        if num_examples is not None:        # None: a masked upload (the weight is inside it)
            query["num_examples"] = num_examples
        if metrics is not None:
            query["metrics"] = json.dumps(metrics)
        path = f"/v1/sessions/{session_id or a['session_id']}/update?{urlencode(query)}"
        return self.transport.request("POST", path, headers={**self.headers, "Content-Type": content_type},
                                      data=body)

    def evaluate(self, top1: int, top3: int, positions: int, model_version: int | None = None) -> Reply:
        a = self.assignment
        return self.transport.request("POST", f"/v1/sessions/{a['session_id']}/eval", headers=self.headers,
                                      json={"model_version": a["model_version"] if model_version is None
                                            else model_version, "top1_hits": top1, "top3_hits": top3,
                                            "positions": positions})

    def fail(self, reason: str = "unplugged") -> Reply:
        body = {"reason": reason}
        return self.transport.request("POST", f"/v1/sessions/{self.assignment['session_id']}/failure",
                                      headers=self.headers, json=body)


def write_small_config(root: Path, **population) -> Path:
    """A server.toml for the small test layout, one population "en" (goal 6, sgd at lr 1)."""
    settings = {"goal": 6, "min_round_size": 1, "over_selection": 1.5, "min_selected_fraction": 0.5, "min_report_fraction": 0.5,
                "selection_window_s": 300.0, "reporting_window_s": 600.0, "eval_every": 0,
                "server_optimizer": "sgd", "server_lr": 1.0, **population}
    lines = ['database = "state/nightjar.db"', 'artifact_dir = "state/artifacts"',
             'state_dir = "state/private"', "tick_interval_s = 0.2", "aggregation_shards = 3",
             "", "[populations.en]"]
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()]
    lines += ["", "[populations.en.eligibility]", "min_separation_s = 0.0", "min_free_memory_mb = 0"]
    path = root / "server.toml"
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def init_small_population(root: Path, config: Path) -> np.ndarray:
    """`python -m server init` with a small random checkpoint and a stand-in plan; its weights."""
    import subprocess
    import sys

    flat = write_checkpoint(root / "init.safetensors")
    done = subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config),
                           "--checkpoint", str(root / "init.safetensors"),
                           "--plan-dir", str(write_plan_dir(root / "plan"))],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return flat


def break_finish(env, monkeypatch, kind: str):
    """Fault injection: `kind`'s finish raises from now on; returns what puts the real one back."""
    task = env.services.kinds[kind]
    real = task.finish
    monkeypatch.setattr(task, "finish", lambda tx, rnd: (_ for _ in ()).throw(RuntimeError("injected")))
    return lambda: monkeypatch.setattr(task, "finish", real)


def served_version(server, number: int, population: str = "en", timeout_s: float = 30.0) -> tuple[dict, np.ndarray]:
    """A running server's version `number` (waiting for its round to finish): its entry in the operator's
    versions list and its checkpoint's weights, fetched over HTTP as any verifier would."""
    import tempfile
    import time

    from contract.model.weights import load_checkpoint

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = requests.get(f"{server.url}/v1/populations/{population}/versions", timeout=10,
                                headers=server.operator_headers).json()["versions"]
        found = [v for v in versions if v["version"] == number]
        if found:
            blob = requests.get(f"{server.url}/v1/artifacts/{found[0]['checkpoint_sha256']}", timeout=10,
                                headers=server.operator_headers).content
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "v.safetensors").write_bytes(blob)
                return found[0], load_checkpoint(Path(tmp) / "v.safetensors")[1]
        time.sleep(0.2)
    raise AssertionError(f"no version {number} of {population} after {timeout_s} s")
