"""Protocol versions on the server: which requests must name one, what an unsupported one gets, and
that the OpenAPI document says exactly that for every operation."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from contract.protocol import version as protocol
from contract.protocol.schema import NO_NUL
from server.app import protocol_rule
from server.openapi import openapi_document
from tests.server_fixtures import ELIGIBLE, DeviceClient, FlaskTransport
from tests.test_server_views import OpenAPIChecker, openapi_path

SERVED = [str(v) for v in range(protocol.SUPPORTED[0], protocol.SUPPORTED[1] + 1)]
UNSUPPORTED = [str(protocol.SUPPORTED[1] + 1), "0", "01", " 1", "1.0", "v1", "²", "9999999", ""]
DEVICE_API = [("POST", "/v1/enrollment/nonces"), ("POST", "/v1/devices"), ("POST", "/v1/checkin"),
              ("POST", "/v1/sessions/s/update"), ("POST", "/v1/sessions/s/eval"),
              ("POST", "/v1/sessions/s/personal"), ("POST", "/v1/sessions/s/discovery"),
              ("POST", "/v1/sessions/s/failure"), ("GET", "/v1/sessions/s/secagg"),
              ("POST", "/v1/sessions/s/secagg/keys"), ("POST", "/v1/sessions/s/secagg/shares"),
              ("POST", "/v1/sessions/s/secagg/reveal")]


def raw(env, method: str, path: str, version: str | None, **kwargs):
    """A request through a test client that adds no protocol header of its own."""
    headers = {**kwargs.pop("headers", {}), **({protocol.HEADER: version} if version is not None else {})}
    return env.app.test_client().open(path, method=method, headers=headers, **kwargs)


def assert_refused(answer) -> None:
    assert answer.status_code == 400, answer.get_json()
    body = answer.get_json()
    assert body["error"] == "unsupported_protocol"
    assert body["supported"] == {"min": protocol.SUPPORTED[0], "max": protocol.SUPPORTED[1]}
    assert protocol.HEADER in body["message"]


def test_the_document_declares_the_header_exactly_where_the_server_reads_it(server_env):
    doc = openapi_document()
    rules = {}
    for rule in server_env.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/dashboard"):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            op = doc["paths"][openapi_path(rule.rule)][method.lower()]
            header = [p for p in op.get("parameters", []) if p["in"] == "header" and p["name"] == protocol.HEADER]
            expected = protocol_rule(rule.endpoint)
            rules[rule.endpoint] = expected
            if expected is None:
                assert header == [], rule.rule
                continue
            assert len(header) == 1 and header[0]["required"] == (expected == "required"), rule.rule
            assert header[0]["schema"] == {"type": "string", "enum": SERVED}
            assert "400" in op["responses"] and "unsupported_protocol" in op["responses"]["400"]["description"]
    required = {e for e, r in rules.items() if r == "required"}
    assert {e.split(".")[0] for e in required} == {"devices", "sessions", "secagg"} and len(required) == 12
    assert {e for e, r in rules.items() if r == "optional"} == {
        "artifacts.get", "populations.latest_app_model", "populations.app_model"}


@pytest.mark.parametrize("method, path", DEVICE_API)
def test_the_device_api_refuses_a_missing_or_unsupported_version_before_reading_anything_else(
        server_env, method, path):
    # no credential, no Content-Type, a body that is not JSON: the version is what is refused
    for version in [None, *UNSUPPORTED]:
        assert_refused(raw(server_env, method, path, version, data=b"\x00not json"))


def test_a_device_speaking_a_served_version_goes_on_and_a_refused_request_changes_nothing(server_env):
    env = server_env
    device = DeviceClient(FlaskTransport(env.client), env.population, env.enrollment)
    body = {"population": env.population, "conditions": ELIGIBLE}

    def sessions() -> int:
        return env.services.store.connection().execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    assert_refused(raw(env, "POST", "/v1/checkin", "2", json=body, headers=device.headers))
    assert sessions() == 0                                   # nothing was assigned
    answer = raw(env, "POST", "/v1/checkin", SERVED[-1], json=body, headers=device.headers)
    assert answer.status_code == 200 and "assignment" in answer.get_json() and sessions() == 1


def test_public_reads_may_leave_the_version_out_but_not_name_an_unsupported_one(server_env):
    env = server_env
    device = DeviceClient(FlaskTransport(env.client), env.population, env.enrollment)
    checkpoint = device.checkin().body["assignment"]["checkpoint"]["url"]
    for path, ok in ((checkpoint, 200), (f"/v1/populations/{env.population}/app-model", 404),
                     (f"/v1/populations/{env.population}/app-model/0", 404)):
        for version in (None, *SERVED):
            assert raw(env, "GET", path, version, headers=device.headers).status_code == ok, (path, version)
        for version in UNSUPPORTED:
            assert_refused(raw(env, "GET", path, version, headers=device.headers))


def test_operator_and_meta_endpoints_do_not_read_the_version(server_env):
    env = server_env
    for path, headers in ((f"/v1/populations/{env.population}/rounds", env.operator_headers),
                          (f"/v1/populations/{env.population}/versions", env.operator_headers),
                          ("/healthz", {}), ("/openapi.json", {})):
        for version in (None, "2", "junk"):
            assert raw(env, "GET", path, version, headers=headers).status_code == 200, (path, version)


def test_every_documented_answer_of_a_refusal_matches_the_error_schema(server_env):
    checker = OpenAPIChecker(server_env.app)
    for method, path in DEVICE_API:
        answer = raw(server_env, method, path, None)
        checker.check(method, path, answer.status_code, answer.get_json(), answer.content_type)


SECURE = {"goal": 400, "min_round_size": 3, "secure_aggregation": True, "update": {"bits": 8}}


@pytest.mark.parametrize("max_json_bytes", [65536, 20000])
def test_a_neighbour_count_whose_honest_shares_would_not_fit_the_json_cap_is_refused_at_load(max_json_bytes):
    from contract.secagg.messages import SecAggReveal, SecAggShares, items_within, largest_body
    from server.config import ConfigError, load_config

    most = items_within(SecAggShares, max_json_bytes)
    assert largest_body(SecAggShares, most) <= max_json_bytes < largest_body(SecAggShares, most + 1)
    assert items_within(SecAggReveal, max_json_bytes) > most        # a reveal's entries are smaller

    def config(neighbours: int | None) -> dict:
        secagg = {"neighbours": neighbours} if neighbours else {}
        return {"max_json_bytes": max_json_bytes, "populations": {"en": {**SECURE, "secagg": secagg}}}

    ok = most if most % 2 == 0 else most - 1                           # k is even
    assert load_config(config(ok)).population("en").secagg.neighbours == ok
    with pytest.raises(ConfigError, match=rf"secagg.neighbours: .* over max_json_bytes \({max_json_bytes}\): "
                                          rf"set secagg.neighbours to at most {most}"):
        load_config(config(ok + 2))
    if max_json_bytes == 65536:
        load_config(config(None))          # the default O(log n) degree fits at the default cap


def test_an_honest_devices_largest_shares_and_reveal_bodies_are_what_largest_body_says(make_server):
    """largest_body against the bytes a phone's HTTP library really writes for k neighbours."""
    import requests

    from contract.secagg.masking import KEY, SELF
    from contract.secagg.messages import SecAggReveal, SecAggShares, items_within, largest_body

    k = items_within(SecAggShares, 65536)
    top = 10**6
    shares = SecAggShares({top - i: bytes(168) for i in range(k)}).to_json()
    reveal = SecAggReveal({top - i: (SELF if i % 2 else KEY, bytes(66)) for i in range(k)}).to_json()
    for message, body in ((SecAggShares, shares), (SecAggReveal, reveal)):
        sent = requests.Request("POST", "http://x/", json=body).prepare().body
        assert len(sent) <= largest_body(message, k) <= 65536, message


def test_every_json_body_the_document_allows_fits_under_the_cap():
    """The largest schema-valid body of each device operation, written as `requests` writes JSON
    (ASCII-escaped: a character outside ASCII takes up to 12 bytes), is at most max_json_bytes."""
    doc = openapi_document()
    schemas = doc["components"]["schemas"]

    def resolve(s):
        while "$ref" in s:
            s = schemas[s["$ref"].split("/")[-1]]
        return s

    def largest(s) -> int:
        s = resolve(s)
        if "oneOf" in s:
            return max(largest(x) for x in s["oneOf"])
        if "enum" in s or "const" in s:
            return max(len(json.dumps(v)) for v in s.get("enum", [s.get("const")]))
        kind = s.get("type")
        if isinstance(kind, list):
            return max(largest({**s, "type": k}) for k in kind)
        if kind == "object":
            assert s.get("additionalProperties") is False or "maxProperties" in s, s
            entries = [len(name) + 4 + largest(v) for name, v in s.get("properties", {}).items()]
            if s.get("additionalProperties") not in (False, None):
                entries += [6 * 64 + 4 + largest(s["additionalProperties"])] * s["maxProperties"]
            return 2 + sum(entries) + 2 * max(0, len(entries) - 1)          # {"name": value, ...}
        if kind == "array":
            return 2 + s["maxItems"] * largest(s["items"]) + 2 * max(0, s["maxItems"] - 1)
        if kind == "string":
            pattern = s.get("pattern", NO_NUL)
            if pattern == NO_NUL:
                return 2 + s["maxLength"] * 12
            classes, rest = re.findall(r"\[(.*?)\]", pattern), re.sub(r"\[.*?\]", "", pattern)
            assert all(c.isascii() and not c.startswith("^") and "\\" not in c for c in classes), pattern
            assert not re.search(r"(?<!\\)\.|\\[A-Za-z]", rest), pattern       # ASCII characters only
            return 2 + s["maxLength"]
        if kind == "integer":       # the widest of its bounds (a float like 1e+16 is no integer here)
            return max(len(str(int(s.get(k, -2**53)))) for k in ("minimum", "maximum"))
        return {"number": 24, "boolean": 5, "null": 4}[kind]

    sizes = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                sizes[f"{method.upper()} {path}"] = largest(content["application/json"]["schema"])
    assert len(sizes) == 10 and max(sizes.values()) <= 65536, sizes


def test_the_documents_examples_are_valid_bodies_the_server_parses():
    from jsonschema import Draft202012Validator

    from contract.protocol import wire
    from server.openapi import EXAMPLES

    doc = openapi_document()
    parsers = {"NonceRequest": wire.NONCE_REQUEST.parse, "CheckinRequest": wire.CHECKIN_REQUEST.parse,
               "EvalReport": wire.EvalReport.from_json, "DiscoveryBallot": wire.DiscoveryBallot.from_json,
               "FailureReport": wire.FailureReport.from_json}
    assert set(EXAMPLES) == set(parsers)
    for name, example in EXAMPLES.items():
        Draft202012Validator({**doc["components"]["schemas"][name], "$defs": {}}).validate(example)
        parsers[name](example)                     # and the server's own check takes it


@pytest.mark.parametrize("optimizer", ["sgdm", "adam"])
def test_the_versions_endpoint_publishes_what_a_verifier_needs_to_recompute_a_version(make_server, optimizer):
    """Two rounds under a server optimizer with state: a verifier holding only the reports it made and
    the versions endpoint's `train` steps the parent itself and lands on the server's version."""
    env = make_server(goal=2, over_selection=1.0, min_report_fraction=1.0, server_optimizer=optimizer,
                      server_lr=0.7 if optimizer == "sgdm" else 0.01, server_momentum=0.5)
    api, rng = FlaskTransport(env.client), np.random.default_rng(5)
    weights = env.flat.astype(np.float32)
    accumulator = preconditioner = np.zeros_like(weights)
    for round_number in (1, 2):
        devices = [DeviceClient(api, env.population, env.enrollment) for _ in range(2)]
        reports = [(rng.normal(0, 0.01, env.layout.size).astype(np.float32), int(n)) for n in (7, 19)]
        for d, (delta, n) in zip(devices, reports):
            assert "assignment" in d.checkin().body and d.upload(delta, n).body["status"] == "accepted"
        env.services.tick()
        versions = env.client.get(f"/v1/populations/{env.population}/versions",
                                  headers=env.operator_headers).get_json()["versions"]
        train = versions[0]["train"]
        assert versions[0]["version"] == round_number and train["optimizer"] == optimizer
        mean = sum(n * d.astype(np.float64) for d, n in reports) / sum(n for _, n in reports)
        g = (-mean).astype(np.float32)
        lr = np.float32(train["server_lr"])
        if optimizer == "sgdm":                    # PROTOCOL.md section 8, from the published parameters
            assert (train["server_lr"], train["server_momentum"]) == (0.7, 0.5)
            accumulator = np.float32(train["server_momentum"]) * accumulator + g
            weights = weights - lr * accumulator
        else:
            assert train["server_momentum"] is None and train["server_lr"] == 0.01
            b1, b2, eps = (np.float32(train[f"server_{k}"]) for k in ("beta_1", "beta_2", "epsilon"))
            accumulator = accumulator + (g - accumulator) * (np.float32(1) - b1)
            preconditioner = preconditioner + (g * g - preconditioner) * (np.float32(1) - b2)
            step = lr * np.sqrt(np.float32(1) - b2 ** round_number) / (np.float32(1) - b1 ** round_number)
            weights = weights - step * accumulator / (np.sqrt(preconditioner) + eps)
        served = env.services.versions.weights(env.services.versions.get(env.population, round_number))
        np.testing.assert_allclose(served, weights, rtol=1e-5, atol=1e-6)
        assert not any(k.startswith("dp_") for k in train)        # no DP here: nothing DP published


def test_an_update_body_is_octet_stream_only_and_the_document_says_so(server_env):
    env = server_env
    device = DeviceClient(FlaskTransport(env.client), env.population, env.enrollment)
    device.checkin()
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    for kind in ("image/png", "application/json", "text/plain", "multipart/form-data"):
        reply = device.upload(body=png, num_examples=1, content_type=kind)
        assert (reply.status, reply.body["error"]) == (415, "unsupported_media_type"), kind
    upload = openapi_document()["paths"]["/v1/sessions/{session_id}/update"]["post"]
    assert list(upload["requestBody"]["content"]) == ["application/octet-stream"]
    assert "415" in upload["responses"] and "415 otherwise" in upload["description"]
