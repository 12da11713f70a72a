"""The known-answer vectors (contract/vectors) and PROTOCOL.md, checked three ways.

* The Python phone and server compute every vector (contract.vectors.reference).
* The files on disk are what the generator makes now: a wire change is a
  deliberate change to the vectors, and a changed vector is a reported mismatch.
* A second implementation written from PROTOCOL.md alone (tests/protocol_impl.py)
  computes every vector of a phone's side, and as an HTTP client
  (tests/protocol_client.py) completes a plain round and a secure round with a
  dropout against the real server, whose new versions equal its predictions
  within float32 rounding.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from contract.vectors import DIRECTORY
from contract.vectors.check import check
from contract.vectors.generate import BUILDERS, stale
from contract.vectors.reference import FUNCTIONS as REFERENCE

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"accept_update", "plausible_bounds", "shamir_decode"}     # per-update refusals, bounds, RS decoding


def _cases() -> list[dict]:
    return [c for path in sorted(DIRECTORY.glob("*.json")) for c in json.loads(path.read_text())["cases"]]


def test_the_python_phone_and_server_compute_every_vector():
    result = check(REFERENCE)
    assert result.failures == [] and result.skipped == {}
    assert result.passed == len(_cases()) >= 150
    assert {c["function"] for c in _cases()} == set(REFERENCE)      # every function has vectors, and only those


def test_the_vectors_on_disk_are_what_the_generator_makes_now():
    assert sorted(p.stem for p in DIRECTORY.glob("*.json")) == sorted(BUILDERS)
    assert stale() == [], "the wire changed: regenerate (python -m contract.vectors generate), commit, and " \
                          "bump the protocol version if a phone could not follow"


def test_a_changed_output_is_a_mismatch_and_the_command_exits_2(tmp_path):
    for path in DIRECTORY.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    document = json.loads((tmp_path / "packing.json").read_text())
    packed = document["cases"][0]["output"]["packed_hex"]
    document["cases"][0]["output"]["packed_hex"] = f"{int(packed[0], 16) ^ 1:x}" + packed[1:]
    (tmp_path / "packing.json").write_text(json.dumps(document))
    result = check(REFERENCE, tmp_path)
    assert len(result.failures) == 1 and "pack 2 bits" in result.failures[0]
    assert stale(tmp_path) == ["packing"]
    done = subprocess.run([sys.executable, "-m", "contract.vectors", "check", "--dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "MISMATCH packing: pack 2 bits" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "contract.vectors", "check", "--impl", "no.such.module"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--impl" in done.stderr


def test_an_implementation_written_from_the_document_computes_every_phone_vector():
    done = subprocess.run([sys.executable, "-m", "contract.vectors", "check", "--impl", "tests.protocol_impl"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    from tests.protocol_impl import FUNCTIONS

    assert set(REFERENCE) - set(FUNCTIONS) == SERVER_ONLY
    implemented = sum(c["function"] in FUNCTIONS for c in _cases())
    assert f"{implemented} vectors passed, 0 failed" in done.stdout, done.stdout


def test_the_independent_client_imports_no_contract_code():
    import ast

    for name in ("protocol_client", "protocol_impl", "protocol_encoding", "protocol_pipeline", "protocol_secagg"):
        tree = ast.parse((REPO / "tests" / f"{name}.py").read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        roots = {m.split(".")[0] for m in modules}
        assert roots <= {"__future__", "base64", "hashlib", "json", "math", "os", "re", "secrets", "struct", "time",
                         "pathlib", "numpy", "requests", "cryptography", "tests"}, (name, roots)
        assert {m for m in modules if m.startswith("tests.")} <= {f"tests.{n}" for n in (
            "protocol_encoding", "protocol_pipeline", "protocol_secagg")}, (name, modules)


# -- the independent client against the real server ----------------------------------------------------------

UPDATE = {"bits": 8, "rotation": True, "clip_norm": 2.5, "max_weight": 100, "block_size": 256}
COMMON = {"min_selected_fraction": 1.0, "selection_window_s": 120.0, "reporting_window_s": 600.0, "eval_every": 0,
          "publish_every": 0, "min_round_size": 1, "server_optimizer": "sgdm", "server_momentum": 0.9}
POPULATIONS = {
    "plain": {**COMMON, "goal": 3, "over_selection": 1.0, "min_report_fraction": 1.0, "server_lr": 0.7},
    "secure": {**COMMON, "goal": 4, "over_selection": 1.25, "min_report_fraction": 0.75, "min_round_size": 3,
               "secure_aggregation": True, "server_lr": 1.3},
}


def _config(root: Path) -> Path:
    lines = ['database = "state/nightjar.db"', 'artifact_dir = "state/artifacts"', 'state_dir = "state/private"',
             "tick_interval_s = 0.2"]
    for name, settings in POPULATIONS.items():
        tables = {"": settings, ".eligibility": {"min_separation_s": 0.0, "min_free_memory_mb": 0}, ".update": UPDATE}
        if settings.get("secure_aggregation"):
            tables[".secagg"] = {"keys_window_s": 60.0, "shares_window_s": 60.0, "unmask_window_s": 120.0}
        for suffix, values in tables.items():
            lines += ["", f"[populations.{name}{suffix}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    root.mkdir(parents=True, exist_ok=True)
    (root / "server.toml").write_text("\n".join(lines) + "\n")
    return root / "server.toml"


def _init(root: Path, config: Path) -> None:
    from tests.server_fixtures import write_checkpoint, write_plan_dir

    write_checkpoint(root / "init.safetensors")
    for name in POPULATIONS:
        done = subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config), "--population", name,
                               "--checkpoint", str(root / "init.safetensors"), "--plan-dir",
                               str(write_plan_dir(root / "plan"))], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _version(server, population: str, number: int, timeout_s: float = 60.0) -> dict:
    """Version `number`'s entry in the operator's versions list (waiting for its round to finish)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = server.operator_get(f"/v1/populations/{population}/versions").json()["versions"]
        found = [v for v in versions if v["version"] == number]
        if found:
            return found[0]
        time.sleep(0.2)
    rounds = server.operator_get(f"/v1/populations/{population}/rounds").json()
    raise AssertionError(f"no version {number} of {population} within {timeout_s} s: {rounds}")


def _weights(server, version: dict, layout: list[dict]) -> np.ndarray:
    from tests.protocol_client import flat_weights

    return flat_weights(server.operator_get(f"/v1/artifacts/{version['checkpoint_sha256']}").content, layout)


def _parameters(version: dict, population: str) -> tuple[str, float, float]:
    """The server optimizer, its learning rate and momentum that made `version`: as the versions endpoint
    publishes them where it does (`train.optimizer` names the optimizer), else the population's config."""
    published: dict = {}
    for where in (version, version.get("train") or {}, version.get("round_parameters") or {}):
        published.update({k: v for k, v in where.items() if not isinstance(v, (dict, list))})
    settings = POPULATIONS[population]
    name = published.get("server_optimizer") or published.get("optimizer") or settings["server_optimizer"]
    lr = published.get("server_lr", published.get("server_learning_rate", settings["server_lr"]))
    return name, float(lr), float(published.get("server_momentum", settings["server_momentum"]))


@pytest.mark.slow
def test_an_independent_client_completes_a_plain_and_a_secure_round_and_predicts_each_version(tmp_path):
    from deploy.server_process import ServerProcess, free_port

    config = _config(tmp_path)
    _init(tmp_path, config)
    server = ServerProcess(config, free_port(), tmp_path / "server.log").start()
    try:
        _plain_rounds(server, tmp_path)
        _secure_round(server, tmp_path)
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.kill()


def _phones(server, root: Path, population: str, n: int) -> list:
    from tests.protocol_client import Phone

    return [Phone(server.url, population, root / "state/private" / f"enrollment-{population}.json").enroll()
            for _ in range(n)]


def _plain_rounds(server, root: Path) -> None:
    """Two plain rounds (sgdm: the second step uses the first's momentum), each predicted exactly."""
    from tests.protocol_client import predict
    from tests import protocol_pipeline as pipe
    from tests.protocol_encoding import Spec

    phones = _phones(server, root, "plain", 3)
    accumulator, rng = None, np.random.default_rng(7)
    for number in (1, 2):
        assert all("assignment" in p.checkin() for p in phones)
        a = phones[0].assignment
        assert (a["round"], a["model_version"], a["task"]) == (number, number - 1, "train")
        weights, spec = phones[0].weights(), Spec(a["update"])
        total, weight_sum = np.zeros(spec.P, np.int64), 0
        for k, phone in enumerate(phones):
            delta = rng.normal(0, 0.03 * (k + 1), spec.N).astype(np.float32)
            outcome, units, w = phone.upload(delta, 20 + 30 * k)
            assert outcome["status"] == "accepted", outcome
            total, weight_sum = total + units, weight_sum + w
        version = _version(server, "plain", number)
        expected, accumulator = predict(weights, pipe.mean_of_sum(spec, total, weight_sum),
                                        *_parameters(version, "plain"), accumulator)
        got = _weights(server, version, a["layout"])
        np.testing.assert_allclose(got, expected, rtol=2e-7, atol=1e-8)
        assert np.abs(got - weights).max() > 1e-3          # the round did move the model


def _secure_round(server, root: Path) -> None:
    """Five selected, four report, one drops out after sharing: the version is the four's mean's step."""
    from tests.protocol_client import predict
    from tests import protocol_pipeline as pipe
    from tests.protocol_encoding import Spec

    phones = _phones(server, root, "secure", 5)
    for phone in phones:
        assert "assignment" in phone.checkin(), phone.assignment
        phone.advertise()
    for phone in phones:
        phone.share()
    spec, weights = Spec(phones[0].assignment["update"]), phones[0].weights()
    assert spec.secure and spec.json["cohort_max"] == 5
    rng, rings = np.random.default_rng(9), []
    for k, phone in enumerate(phones[:4]):                  # phones[4] drops out: it never uploads
        outcome, ring = phone.masked_upload(rng.normal(0, 0.02, spec.N).astype(np.float32), 15 + 20 * k)
        assert outcome["status"] == "accepted", outcome
        rings.append(ring)
    for phone in phones[:4]:
        status = phone.wait_for("unmasking")
        assert len(status["survivors"]) == 3 and len(status["dropped"]) == 1, status
        phone.reveal()
    plain = pipe.reduce(spec, np.sum(np.asarray(rings, np.int64), axis=0))
    weight_sum, mean = pipe.decode_masked(spec, plain, 4)
    assert weight_sum == 15 + 35 + 55 + 75
    version = _version(server, "secure", 1)
    expected, _ = predict(weights, mean, *_parameters(version, "secure"), None)
    got = _weights(server, version, phones[0].assignment["layout"])
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=1e-8)
    detail = server.operator_get("/v1/populations/secure/rounds/1").json()
    assert detail["state"] == "completed" and detail["reported"] == 4 and detail["secagg"]["survivors"] == 4


def test_the_openapi_documents_fixed_lengths_are_the_vectors_bytes():
    """Keys, commitments, ciphertexts and shares are fixed-length base64url in the OpenAPI document: the
    lengths PROTOCOL.md gives (43, 224, 88 characters) and the vectors' byte counts (32, 168, 66)."""
    from server.openapi import openapi_document

    schemas = openapi_document()["components"]["schemas"]
    lengths = {"enc_pk": schemas["SecAggKeys"]["properties"]["enc_pk"],
               "commitment": schemas["SecAggKeys"]["properties"]["commitment"],
               "ciphertext": schemas["SecAggShares"]["properties"]["shares"]["items"]["properties"]["ciphertext"],
               "share": schemas["SecAggReveal"]["properties"]["shares"]["items"]["properties"]["share"]}
    assert {k: (v["minLength"], v["maxLength"]) for k, v in lengths.items()} == {
        "enc_pk": (43, 43), "commitment": (43, 43), "ciphertext": (224, 224), "share": (88, 88)}
    primitives = {c["function"]: c for c in json.loads((DIRECTORY / "secagg_primitives.json").read_text())["cases"]}
    assert len(bytes.fromhex(primitives["share_encrypt"]["output"]["ciphertext_hex"])) == 168
    assert len(primitives["share_encrypt"]["output"]["ciphertext"]) == 224
    assert len(bytes.fromhex(primitives["share_encrypt"]["output"]["plaintext_hex"])) == 140
    assert all(len(bytes.fromhex(s)) == 66 for s in primitives["shamir_split"]["output"]["shares_hex"].values())
    assert "168 bytes" in lengths["ciphertext"]["description"]


def test_an_integer_field_takes_a_whole_number_float_and_nothing_else():
    from contract.protocol.errors import ProtocolError
    from contract.protocol.schema import Int

    assert Int(0).parse(13468.0) == 13468 and isinstance(Int(0).parse(13468.0), int)
    for bad in (1.5, True, "3", float("nan")):
        with pytest.raises(ProtocolError):
            Int(0).parse(bad)


# -- what writing PROTOCOL.md found: the code disagreeing with the document ------------------------------------


def test_a_config_with_an_integer_clip_norm_still_makes_rounds_devices_and_server_can_read(make_server):
    """The fingerprint is over the spec's fields as the schema types them (a float is a float): with
    `clip_norm = 5` in a config, the server's fingerprint was over `5` and every reader's over `5.0`, so
    every check-in of the population answered 400 invalid_field."""
    from contract.update.spec import RoundSpec, UpdateSpec
    from tests.server_fixtures import DeviceClient, FlaskTransport

    spec = UpdateSpec(clip_norm=5, block_size=1024.0, zeroing=2).bind(300, "a" * 64, "en/1", 7)
    assert RoundSpec.from_json(spec.to_json()).fingerprint == spec.fingerprint
    assert '"clip_norm": 5.0' in json.dumps(spec.to_json())
    env = make_server(update={"bits": 8, "clip_norm": 5, "max_weight": 100})
    device = DeviceClient(FlaskTransport(env.client), "en", env.enrollment)
    for _ in range(2):                       # the round as created, and as read back from the database
        reply = device.checkin()
        assert reply.status == 200 and reply.body["assignment"]["update"]["clip_norm"] == 5.0, reply.body


@pytest.mark.parametrize("nonce", [5, None, ["n"], {"n": 1}])
def test_an_issuer_signed_statement_of_the_wrong_types_is_401_not_500(server_env, nonce):
    """The statement is an object of exactly its fields, each of its type (PROTOCOL.md 4.2): a signed
    statement whose nonce was not a string used to reach the nonce lookup and answer 500."""
    from contract.protocol.attestation import b64encode
    from device_runtime.enrollment import KeyAttester
    from server.keys import enrollment_material

    material = enrollment_material(server_env.services.config.enrollment_path("en"))
    issuer = KeyAttester.from_text(material["issuer_private_key"])._key
    statement = json.dumps({"population": "en", "nonce": nonce, "verdict": "MEETS_DEVICE_INTEGRITY",
                            "app_id": "x", "issued_at": 1.0, "version": 1}).encode()
    reply = server_env.client.post("/v1/devices", json={
        "population": "en", "app_credential": material["app_credential"],
        "attestation": {"statement": b64encode(statement), "signature": b64encode(issuer.sign(statement))}})
    assert (reply.status_code, reply.get_json()["error"]) == (401, "bad_attestation")
