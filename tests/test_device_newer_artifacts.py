"""A phone facing a newer server: manifests of a schema version it does not read are refused cleanly.

A server of this release cannot publish such a manifest (it reads its own
with the same code), so a stand-in for a newer server serves them over real
HTTP: the published app-model description, the artifacts by hash, and
records every request. The app model and its manifest are a real TINY export
loaded in LiteRT; the newer manifest is that export's with `schema_version`
raised. On every path the phone opens a manifest — the published app model,
a restart's installed models, a task's plan, personalization's plan — the
newer one is refused with its reason logged, nothing more of it is
downloaded, and the model the phone had keeps answering.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import shutil
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.artifacts.manifest import SUPPORTED_SCHEMA_VERSIONS
from contract.protocol import version as protocol
from contract.protocol.wire import Assignment
from contract.tasks.personal import PersonalSpec
from device_runtime.conditions import EmulatedConditions
from device_runtime.enrollment import Enrollment, KeyAttester
from device_runtime.predictor import MANIFEST_NAME, Predictor
from device_runtime.runtime import Device, DeviceSettings
from tests.device_world import NIGHT

pytestmark = pytest.mark.slow
NEWER = max(SUPPORTED_SCHEMA_VERSIONS) + 1
CONTEXT = "the king doth"


class NewerServer:
    """Serves `routes` (path → JSON-able or bytes) on loopback and records (method, path, headers, body)."""

    def __init__(self):
        self.routes: dict[str, object] = {}
        self.requests: list[tuple[str, str, dict, bytes]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append((self.command, self.path, dict(self.headers), body))
                value = server.routes.get(self.path)
                if value is None:
                    data, status = b'{"error": "not_found", "message": "no"}', 404
                else:
                    data, status = value if isinstance(value, bytes) else json.dumps(value).encode(), 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_port}"

    def put(self, data: bytes) -> dict:
        """Serve `data` as an artifact; its reference."""
        sha = hashlib.sha256(data).hexdigest()
        self.routes[f"/v1/artifacts/{sha}"] = data
        return {"url": f"/v1/artifacts/{sha}", "sha256": sha}

    def fetched(self, ref: dict, since: int = 0) -> bool:
        """Whether `ref` was requested (after the first `since` requests)."""
        return any(path == ref["url"] for _, path, _, _ in self.requests[since:])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A real TINY app model (version 1): its directory and manifest."""
    from emulation.models import tiny_corpus
    from models.model import TINY
    from models.simulate import initial_weights
    from tflite_export import export_app_model

    corpus = tiny_corpus()
    config = TINY.with_vocab(len(corpus.vocab))
    manifest = export_app_model(config, initial_weights(dataclasses.replace(config, init_seed=1)), corpus.vocab,
                                tmp_path_factory.mktemp("app") / "v1", k=3, model_version=1)
    return manifest.parent, json.loads(manifest.read_text())


def newer_manifest(manifest: dict, **changes) -> bytes:
    return json.dumps({**manifest, "schema_version": NEWER, **changes}, indent=2).encode()


def publish(server: NewerServer, directory, manifest_bytes: bytes, version: int, **extra) -> dict:
    """Serve the export's files and `manifest_bytes` as the published app model `version`."""
    manifest = json.loads(manifest_bytes)
    files = {name: {**server.put((directory / name).read_bytes()), "bytes": rec["bytes"]}
             for name, rec in manifest["files"].items()}
    description = {"population": "en", "version": version, "published_at": 1.0,
                   "manifest": server.put(manifest_bytes), "files": files, **extra}
    server.routes["/v1/populations/en/app-model"] = description
    return description


@pytest.fixture
def newer_server():
    server = NewerServer()
    server.thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()


def device(tmp_path, server: NewerServer) -> Device:
    d = Device(tmp_path / "phone", server.url, EmulatedConditions(lambda: NIGHT), settings=DeviceSettings("en"),
               enrollment=Enrollment("credential", KeyAttester(Ed25519PrivateKey.generate())), seed=0)
    d.examples.add("the king doth speak to the hall. my lord doth come to the queen.")
    return d


def latest(phone: Device, kind: str) -> dict:
    """The phone's newest participation-log event of `kind`."""
    return next(e for e in phone.opstats.events() if e["kind"] == kind)


def test_a_newer_app_model_and_personal_plan_are_refused_and_the_old_model_keeps_answering(
        tmp_path, newer_server, export):
    directory, manifest = export
    phone = device(tmp_path, newer_server)
    publish(newer_server, directory, (directory / MANIFEST_NAME).read_bytes(), 1)
    assert phone.refresh_app_model() == 1
    before = phone.predictor.suggest(CONTEXT)
    assert before

    plan_manifest = newer_server.put(newer_manifest(manifest, kind="training_plan", batch_size=4, k=None))
    plan_file = newer_server.put(b"a plan this phone never loads")
    personal = {"spec": PersonalSpec().to_json(), "checkpoint": newer_server.put(b"weights"),
                "plan": {**plan_file, "manifest": plan_manifest}, "vocab": newer_server.put(b"[]")}
    description = publish(newer_server, directory, newer_manifest(manifest, model_version=2), 2,
                          personalization=personal)
    mark = len(newer_server.requests)
    assert phone.refresh_app_model() == 1                              # refused: version 1 stays
    assert phone.predictor.version == 1 and phone.predictor.suggest(CONTEXT) == before
    refused = latest(phone, "app_model")
    assert refused["outcome"] == "error"
    assert f"manifest schema version {NEWER} is not supported" in refused["error"], refused
    model_file = description["files"][manifest["artifact"]]
    assert newer_server.fetched(description["manifest"], mark) and not newer_server.fetched(model_file, mark)
    assert not (phone.dir / "app" / "2").exists()

    assert phone.personalize(phone.examples.texts(now=phone.clock.now())) is False   # its plan is newer too
    refused = latest(phone, "personalize")
    assert refused["outcome"] == "error" and f"schema version {NEWER}" in refused["error"], refused
    assert not newer_server.fetched(plan_file) and not newer_server.fetched(personal["checkpoint"])
    assert not phone.predictor.personal_active and phone.predictor.suggest(CONTEXT) == before

    # every request the phone made said which protocol version it speaks
    assert newer_server.requests
    assert all(h.get(protocol.HEADER) == str(protocol.CURRENT) for _, _, h, _ in newer_server.requests)
    phone.close()


def test_a_task_whose_plan_is_newer_fails_with_a_reason_code_and_downloads_nothing_else(
        tmp_path, newer_server, export):
    _, manifest = export
    phone = device(tmp_path, newer_server)
    plan_manifest = newer_server.put(newer_manifest(manifest, kind="training_plan", batch_size=4, k=None))
    plan_file, checkpoint = newer_server.put(b"plan"), newer_server.put(b"checkpoint")
    assignment = Assignment(
        session_id="s-1", task="eval", population="en", round=1, model_version=1,
        plan={**plan_file, "manifest": plan_manifest}, checkpoint=checkpoint, vocab=newer_server.put(b"[]"),
        hyperparameters={"seed": 1}, report_deadline=phone.clock.now() + 600, report_deadline_in_s=600.0,
        report_url="/v1/sessions/s-1/eval", failure_url="/v1/sessions/s-1/failure")
    newer_server.routes["/v1/sessions/s-1/failure"] = {"status": "recorded"}

    assert phone.run_task(assignment, phone.examples.texts(now=phone.clock.now())) == "error"
    failures = [json.loads(body) for method, path, _, body in newer_server.requests
                if method == "POST" and path == assignment.failure_url]
    assert failures == [{"reason": "error"}]                  # the code only leaves the phone
    logged = latest(phone, "task")
    assert f"manifest schema version {NEWER} is not supported" in logged["detail"], logged
    assert not newer_server.fetched(plan_file) and not newer_server.fetched(checkpoint)
    phone.close()


def test_a_restarted_keyboard_skips_an_installed_model_it_cannot_read_and_says_why(tmp_path, export, caplog):
    directory, manifest = export
    app = tmp_path / "app"
    shutil.copytree(directory, app / "1")
    shutil.copytree(directory, app / "2")
    (app / "2" / MANIFEST_NAME).write_bytes(newer_manifest(manifest, model_version=2))
    predictor = Predictor()
    with caplog.at_level(logging.WARNING, logger="device_runtime.predictor"):
        assert predictor.install_latest(app) == 1
    assert any(f"schema version {NEWER} is not supported" in r.getMessage() for r in caplog.records)
    assert predictor.suggest(CONTEXT)
