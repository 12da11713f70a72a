"""Who may be a device, and what an operator sees: enrollment, revocation, the minimum cohort, lockdown.

In-process servers (tests/conftest.py make_server) with their own enrollment
material: an app credential and a development attestation issuer, as
`python -m server init` writes them.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contract.protocol.attestation import GENUINE, AttestationStatement, sign
from device_runtime.enrollment import Enrollment, KeyAttester
from tests.server_fixtures import DeviceClient, FlaskTransport, enroll


def device_count(env) -> int:
    return env.services.store.connection().execute("SELECT COUNT(*) FROM devices").fetchone()[0]


def nonce(api, population="en") -> str:
    return api.request("POST", "/v1/enrollment/nonces", json={"population": population}).body["nonce"]


def test_enrollment_needs_the_credential_a_fresh_nonce_and_the_issuers_signature(make_server):
    env = make_server()
    other = make_server("fr")                            # another population, its own issuer
    api = FlaskTransport(env.client)
    good = env.enrollment
    thief = Enrollment(good.app_credential, KeyAttester(Ed25519PrivateKey.generate()))   # credential, no key
    cases = {
        "no credential": (lambda: enroll(api, "en", good, credential="guess"), 401, "bad_credential"),
        "another population's credential": (lambda: enroll(api, "en", good, credential=other.enrollment
                                                           .app_credential), 401, "bad_credential"),
        "a stolen credential, no attestation key": (lambda: enroll(api, "en", thief), 401, "bad_attestation"),
        "a statement for another population": (lambda: enroll(api, "en", good, attestation=good.attester.attest(
            "fr", nonce(api))), 401, "bad_attestation"),
        "a nonce the server never gave": (lambda: enroll(api, "en", good, attestation=good.attester.attest(
            "en", "made-up-nonce")), 401, "bad_nonce"),
        "another population's nonce": (lambda: enroll(api, "en", good, attestation=good.attester.attest(
            "en", nonce(FlaskTransport(other.client), "fr"))), 401, "bad_nonce"),
        "a tampered statement": (lambda: enroll(api, "en", good, attestation=type(good.attester.attest(
            "en", nonce(api)))(statement="eyJ4IjoxfQ", signature="AAAA")), 401, "bad_attestation"),
    }
    for name, (attempt, status, code) in cases.items():
        reply = attempt()
        assert (reply.status, reply.body["error"]) == (status, code), (name, reply.body)
    assert device_count(env) == 0                        # nothing was registered

    n = nonce(api)
    statement = good.attester.attest("en", n)
    first = enroll(api, "en", good, attestation=statement)
    assert first.status == 201 and first.body["authorization"].startswith("Bearer d-")
    replayed = enroll(api, "en", good, attestation=statement)   # the same signed statement again
    assert (replayed.status, replayed.body["error"]) == (401, "bad_nonce")
    assert device_count(env) == 1


def test_a_statement_without_a_genuine_verdict_or_an_expired_nonce_is_refused(make_server):
    env = make_server()
    api = FlaskTransport(env.client)
    key = Ed25519PrivateKey.from_private_bytes(   # the issuer's own key, signing a failing verdict
        __import__("contract.protocol.attestation", fromlist=["b64decode"]).b64decode(json.loads(
            env.services.config.enrollment_path("en").read_text())["issuer_private_key"], "key"))
    rooted = sign(AttestationStatement("en", nonce(api), "FAILS_DEVICE_INTEGRITY", "app", 0.0), key)
    assert enroll(api, "en", env.enrollment, attestation=rooted).body["error"] == "bad_attestation"
    late = nonce(api)
    env.clock.advance(301)                               # past the nonce's 300 s
    reply = enroll(api, "en", env.enrollment, attestation=env.enrollment.attester.attest("en", late))
    assert reply.body["error"] == "bad_nonce"
    assert sign(AttestationStatement("en", "x", GENUINE, "app", 0.0), key).statement   # the format works


def test_five_devices_with_a_stolen_credential_but_no_attestation_cannot_form_a_round(make_server):
    env = make_server(goal=5, min_round_size=5, over_selection=1.0, min_report_fraction=1.0)
    api = FlaskTransport(env.client)
    thief = Enrollment(env.enrollment.app_credential, KeyAttester(Ed25519PrivateKey.generate()))
    for _ in range(5):
        assert enroll(api, "en", thief).status == 401
    assert device_count(env) == 0
    checkin = api.request("POST", "/v1/checkin", json={"population": "en", "conditions": {}},
                          headers={"Authorization": "Bearer d-sybil:secret"})
    assert checkin.status == 401
    assert env.services.analytics.list("en", env.clock.now()) == []     # no round was ever opened


def test_the_minimum_cohort_means_no_version_from_fewer_reports(make_server):
    env = make_server(goal=5, min_round_size=5, over_selection=1.0, min_report_fraction=0.2)
    api = FlaskTransport(env.client)
    devices = [DeviceClient(api, "en", env.enrollment) for _ in range(5)]
    for d in devices:
        d.checkin()
    for d in devices[:4]:
        assert d.upload(np.zeros(env.layout.size, np.float32), 3).body["status"] == "accepted"
    env.clock.advance(400)
    env.services.tick()
    (latest,) = env.services.analytics.list("en", env.clock.now(), limit=1)
    assert (latest["state"], latest["reason"], latest["min_reports"]) == ("failed", "too_few_reports", 5)
    assert [v.version for v in env.services.versions.list("en")] == [0]
    with pytest.raises(Exception, match="min_round_size"):
        make_server(goal=3, min_round_size=5)


def test_a_revoked_device_is_refused_and_its_round_completes_without_it(make_server):
    env = make_server(goal=3, over_selection=1.0, min_report_fraction=2 / 3, min_round_size=2)
    api = FlaskTransport(env.client)
    devices = [DeviceClient(api, "en", env.enrollment) for _ in range(3)]
    for d in devices:
        d.checkin()
    delta = np.full(env.layout.size, 0.01, np.float32)
    assert devices[0].upload(delta, 5).body["status"] == "accepted"
    detail = api.request("GET", "/v1/populations/en/rounds/1", headers=env.operator_headers).body
    victim = next(d["device"] for d in detail["devices"] if d["outcome"] == "assigned")
    revoked = api.request("POST", f"/v1/populations/en/devices/{victim}/revoke", headers=env.operator_headers)
    assert revoked.status == 200 and revoked.body["revoked"] is True
    by_id = {env.services.registry.pseudonym(d.device_id): d for d in devices}
    refused = by_id[victim].upload(delta, 5)
    assert (refused.status, refused.body["error"]) == (403, "device_revoked")
    assert by_id[victim].checkin().status == 403
    survivor = next(d for p, d in by_id.items() if p != victim and d is not devices[0])
    assert survivor.upload(delta, 5).body["status"] == "accepted"   # 2 of 3: the round completes now
    detail = api.request("GET", "/v1/populations/en/rounds/1", headers=env.operator_headers).body
    assert (detail["state"], detail["reported"], detail["failure_reasons"]) == ("completed", 2, {"revoked": 1})


def test_operator_views_are_closed_and_show_no_id_no_text_no_path(make_server):
    env = make_server(goal=1, over_selection=1.0, eval_every=1)
    api = FlaskTransport(env.client)
    dev = DeviceClient(api, "en", env.enrollment)
    dev.checkin()
    assert dev.upload(np.zeros(env.layout.size, np.float32), 2).body["status"] == "accepted"
    failing = DeviceClient(api, "en", env.enrollment)
    failing.checkin()
    with_text = api.request("POST", f"/v1/sessions/{failing.assignment['session_id']}/failure",
                            headers=failing.headers, json={"reason": "error", "detail": "user typed: meet me"})
    assert (with_text.status, with_text.body["error"]) == (400, "invalid_field")    # no free text accepted
    assert failing.fail("error").body["status"] == "recorded"
    operator_paths = ["/v1/populations/en/rounds", "/v1/populations/en/rounds/1", "/v1/populations/en/rounds/2",
                      "/v1/populations/en/versions"]
    for path in operator_paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}, dev.headers):
            reply = api.request("GET", path, headers=headers)
            assert (reply.status, reply.body["error"]) == (401, "unauthorized"), (path, headers)
    revoke = api.request("POST", "/v1/populations/en/devices/p-0000000000000000/revoke")
    assert revoke.status == 401
    text = " ".join(json.dumps(api.request("GET", p, headers=env.operator_headers).body) for p in operator_paths)
    assert dev.device_id not in text and failing.device_id not in text
    assert "meet me" not in text and str(env.root) not in text and "/" + "tmp" not in text
    assert re.findall(r'"device": "(p-[0-9a-f]{16})"', text)            # pseudonyms instead


def test_artifacts_of_unpublished_versions_go_only_to_devices_of_their_rounds(make_server):
    env = make_server(goal=1, over_selection=1.0)
    api = FlaskTransport(env.client)
    dev = DeviceClient(api, "en", env.enrollment)
    a = dev.checkin().body["assignment"]
    outsider = DeviceClient(api, "en", env.enrollment)          # enrolled, never assigned
    for ref in (a["checkpoint"], a["plan"], a["plan"]["manifest"], a["vocab"]):
        assert api.request("GET", ref["url"]).status == 404                       # no credentials
        assert api.request("GET", ref["url"], headers=outsider.headers).status == 404
        assert api.request("GET", ref["url"], headers=dev.headers).status == 200
        assert api.request("GET", ref["url"], headers=env.operator_headers).status == 200
