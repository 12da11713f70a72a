"""The HTTP layer through Flask's test client: every endpoint's success and errors, validated
against /openapi.json, with stored state unchanged by every refused request, and fuzzing."""
from __future__ import annotations

import json
import re
import sqlite3
from urllib.parse import quote

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from safetensors.numpy import save

from contract.update.pipeline import FORMAT

from server.openapi import openapi_document
from tests.server_fixtures import ELIGIBLE, DeviceClient, FlaskTransport

DOC_URI = "urn:nightjar:openapi"


def openapi_path(rule: str) -> str:
    """A Flask rule's path as OpenAPI writes it: /rounds/<int(max=..):number> → /rounds/{number}."""
    return re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule)


class OpenAPIChecker:
    """Validates a response's status and JSON body against the operation Flask routed it to."""

    def __init__(self, app):
        self.app = app
        self.doc = openapi_document()
        self.registry = Registry().with_resource(
            DOC_URI, Resource.from_contents(self.doc, default_specification=DRAFT202012))
        self.seen: set[tuple[str, str, int]] = set()

    def template(self, method: str, path: str) -> str | None:
        adapter = self.app.url_map.bind("localhost")
        try:
            rule, _ = adapter.match(path.split("?")[0], method=method, return_rule=True)
        except Exception:   # 404/405: no route, checked by the caller
            return None
        return openapi_path(rule.rule)

    def check(self, method: str, path: str, status: int, body, content_type: str) -> None:
        template = self.template(method, path)
        if template is None:
            assert status in (404, 405) and set(body) == {"error", "message"}, (path, status, body)
            return
        responses = self.doc["paths"][template][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {template} answered undocumented {status}: {body}"
        self.seen.add((method.upper(), template, status))
        content = responses[str(status)].get("content", {})
        if "application/json" in content:
            assert content_type.startswith("application/json"), (template, status, content_type)
            pointer = "/".join(["#", "paths", template.replace("/", "~1"), method.lower(), "responses",
                                str(status), "content", "application~1json", "schema"])
            validator = Draft202012Validator({"$ref": DOC_URI + quote(pointer, safe="#/~")},
                                             registry=self.registry)
            errors = list(validator.iter_errors(body))
            assert not errors, f"{method} {template} {status}: {errors[0].message} in {body}"
        elif "application/octet-stream" in content:
            assert content_type == "application/octet-stream"


def checked_server(make_server, **population):
    """make_server(**population) with `env.api`: every request and answer checked against /openapi.json."""
    env = make_server(**population)
    env.checker = OpenAPIChecker(env.app)
    env.api = CheckedTransport(env.client, env.checker)
    return env


def train_one_round(env, devices: int) -> None:
    """`devices` new devices check in to a training round and each uploads a zero update."""
    from tests.server_fixtures import DeviceClient

    for d in [DeviceClient(env.api, "en", env.enrollment) for _ in range(devices)]:
        assert d.checkin().body["assignment"]["task"] == "train"
        assert d.upload(np.zeros(env.layout.size, np.float32), 5).body["status"] == "accepted"


class CheckedTransport(FlaskTransport):
    def __init__(self, client, checker: OpenAPIChecker):
        super().__init__(client)
        self.checker = checker

    def request(self, method, path, **kwargs):
        reply = super().request(method, path, **kwargs)
        self.checker.check(method, path, reply.status, reply.body, reply.headers.get("Content-Type", ""))
        return reply


@pytest.fixture
def api(server_env):
    checker = OpenAPIChecker(server_env.app)
    return CheckedTransport(server_env.client, checker)


def dump_tables(store) -> str:
    """Every row of every table, in a fixed order, on either backend (rate-limit buckets excluded:
    on PostgreSQL they share the database, and a refused request does take a token)."""
    conn = store.connection()
    lines = []
    for table in store.tables():
        if table in ("rate_buckets",):
            continue
        rows = [tuple(r) for r in conn.execute(f"SELECT * FROM {table}").fetchall()]
        lines += [f"{table} {row!r}" for row in sorted(rows, key=repr)]
    return "\n".join(lines)


def state_of(env) -> str:
    """Everything a request could change: all tables, the partial sums and the artifacts."""
    dump = dump_tables(env.services.store)
    files = sorted(str(p.relative_to(env.root)) for p in (env.root / "private").rglob("*.i64"))
    return dump + "\n" + "\n".join(files) + "\n" + "\n".join(sorted(env.services.artifacts))


def fleet(env, api, n):
    return [DeviceClient(api, env.population, env.enrollment) for _ in range(n)]


def test_openapi_documents_exactly_the_routes(server_env):
    checker = OpenAPIChecker(server_env.app)
    routes = {(openapi_path(r.rule), m)
              for r in server_env.app.url_map.iter_rules()
              if r.endpoint != "static" and not r.rule.startswith("/dashboard")   # HTML: test_dashboard
              for m in r.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, m.upper()) for path, ops in checker.doc["paths"].items() for m in ops}
    assert routes == documented
    Draft202012Validator.check_schema({"$defs": checker.doc["components"]["schemas"]})


def test_full_protocol_over_http_matches_the_openapi_document(make_server):
    env = make_server(goal=2, over_selection=1.5, eval_every=1, publish_every=1)
    checker = OpenAPIChecker(env.app)
    api = CheckedTransport(env.client, checker)
    devs = fleet(env, api, 4)
    answers = [d.checkin().body for d in devs]
    assert ["assignment" in a for a in answers] == [True, True, True, False]
    assignment = answers[0]["assignment"]
    assert assignment["update"]["size"] == env.layout.size and assignment["plan"]["manifest"]["url"]
    ckpt = api.request("GET", assignment["checkpoint"]["url"], headers=devs[0].headers)
    assert ckpt.status == 200 and ckpt.headers["ETag"] == f'"{assignment["checkpoint"]["sha256"]}"'
    assert "immutable" in ckpt.headers["Cache-Control"] and "private" in ckpt.headers["Cache-Control"]
    again = api.request("GET", assignment["checkpoint"]["url"],
                        headers={"If-None-Match": ckpt.headers["ETag"], **devs[0].headers})
    assert again.status == 304 and again.content == b""
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.01, env.layout.size).astype(np.float32)
    first = devs[0].upload(delta, 12, metrics={"loss": 2.5})
    assert first.body == {"status": "accepted", "round": 1}
    assert devs[0].upload(delta, 12).body["reason"] == "duplicate"
    assert devs[1].fail("unplugged").body["status"] == "recorded"
    assert devs[2].upload(delta, 3).body["status"] == "accepted"          # 2 reports: goal
    evaluators = fleet(env, api, 2)
    for d in evaluators:
        assert d.checkin().body["assignment"]["task"] == "eval"
        assert d.evaluate(10, 20, 100).body["status"] == "accepted"
    assert env.services.publisher.run_pending() == 1
    latest = api.request("GET", "/v1/populations/en/app-model")
    assert latest.status == 200 and latest.body["version"] == 1
    model = api.request("GET", latest.body["model"]["url"])            # published: anyone may fetch it
    assert model.status == 200 and "public" in model.headers["Cache-Control"]
    assert api.request("GET", "/v1/populations/en/app-model/1").body == latest.body
    op = env.operator_headers
    assert api.request("GET", "/v1/populations/en/rounds", headers=op).body["rounds"][0]["task"] == "eval"
    detail = api.request("GET", "/v1/populations/en/rounds/1", headers=op).body
    assert detail["failure_reasons"] == {"unplugged": 1} and len(detail["devices"]) == 3
    versions = api.request("GET", "/v1/populations/en/versions?limit=1", headers=op).body["versions"]
    assert versions[0]["version"] == 1 and versions[0]["dp"] is None
    assert api.request("GET", "/v1/populations/en/privacy", headers=op).body == {"dp": None}   # tests/test_dp_server.py
    pseudonym = detail["devices"][1]["device"]
    assert api.request("POST", f"/v1/populations/en/devices/{pseudonym}/revoke", headers=op).status == 200
    assert api.request("GET", "/openapi.json").body["openapi"].startswith("3.1")
    assert api.request("GET", "/healthz").body == {"status": "ok"}
    assert b"nightjar_checkins_total" in api.request("GET", "/metrics", headers=op).content   # test_dashboard
    ok_paths = {t for (_, t, s) in checker.seen if s < 300}
    secure = {path for path in checker.doc["paths"] if "/secagg" in path}   # tests/test_secagg_server.py
    discovery = {path for path in checker.doc["paths"] if "/discovery" in path}   # test_discovery_server.py
    personal = {path for path in checker.doc["paths"] if path.endswith("/personal")}   # test_personal_server.py
    assert ok_paths == set(checker.doc["paths"]) - secure - discovery - personal


def test_refused_requests_are_json_4xx_and_change_nothing(make_server):
    env = make_server(server={"max_upload_bytes": 4096, "max_json_bytes": 2048})
    api = CheckedTransport(env.client, OpenAPIChecker(env.app))
    mine, other = fleet(env, api, 2)
    mine.checkin()
    other.checkin()
    sid = mine.assignment["session_id"]
    n = env.layout.size
    upload = f"/v1/sessions/{sid}/update?model_version=0&num_examples=5"
    auth = mine.headers

    def raw(data: bytes, headers: dict | None = auth, ctype: str = "application/octet-stream") -> dict:
        return {"data": data, "headers": {**(headers or {}), "Content-Type": ctype}}

    def jraw(data: bytes) -> dict:
        return raw(data, ctype="application/json")

    def js(body, headers: dict | None = auth) -> dict:
        return {"json": body, "headers": headers or {}}

    def values(v: np.ndarray, spec: str | None = None, bits: str = "32") -> bytes:
        meta = {"format": FORMAT, "bits": bits, "spec": spec or mine.assignment["update"]["fingerprint"]}
        return save({"values": v}, metadata=meta)

    good, _ = mine.encode(np.zeros(n, np.float32), 5)
    big = np.zeros(n, np.float32)
    big[:3] = 70.0                                     # each value below the clip (100), the norm above
    checkin = {"population": "en", "conditions": ELIGIBLE}
    op = {"headers": env.operator_headers}
    eval_body = {"model_version": 0, "top1_hits": 1, "top3_hits": 2, "positions": 3}
    cases = [
        ("POST", "/v1/checkin", jraw(b"{not json"), 400, "malformed_json"),
        ("POST", "/v1/checkin", jraw(b'{"population": NaN}'), 400, "malformed_json"),
        ("POST", "/v1/checkin", raw(b'{"population": "en"}', ctype="text/plain"), 415,
         "unsupported_media_type"),
        ("POST", "/v1/checkin", js([1, 2]), 400, "invalid_body"),
        ("POST", "/v1/checkin", js({"population": "en"}), 400, "missing_field"),
        ("POST", "/v1/checkin", js({**checkin, "population": 7}), 400, "invalid_field"),
        ("POST", "/v1/checkin", js({**checkin, "conditions": {**ELIGIBLE, "idle": "yes"}}), 400,
         "invalid_field"),
        ("POST", "/v1/checkin", js({**checkin, "population": "fr"}), 403, "wrong_population"),
        ("POST", "/v1/checkin", js(checkin, headers=None), 401, "unauthorized"),
        ("POST", "/v1/checkin", js(checkin, {"Authorization": "Bearer d-nobody:secret"}), 401,
         "unknown_device"),
        ("POST", "/v1/checkin", js(checkin, {"Authorization": f"Bearer {mine.device_id}:wrong"}), 401,
         "unknown_device"),
        ("POST", "/v1/checkin", jraw(b'{"population": "' + b"x" * 3000 + b'"}'), 413, "payload_too_large"),
        ("POST", upload, raw(good, other.headers), 403, "not_your_session"),
        ("POST", "/v1/sessions/s-nope/update?model_version=0&num_examples=5", raw(good), 404,
         "unknown_session"),
        ("POST", upload, raw(good, ctype="application/json"), 415, "unsupported_media_type"),
        ("POST", upload, raw(values(np.zeros(n - 1, np.float32))), 422, "wrong_length"),
        ("POST", upload, raw(values(np.zeros(n, np.float16))), 422, "wrong_width"),
        ("POST", upload, raw(values(np.zeros(n, np.float32), bits="8")), 422, "wrong_width"),
        ("POST", upload, raw(values(np.full(n, np.nan, np.float32))), 422, "non_finite"),
        ("POST", upload, raw(values(np.full(n, np.inf, np.float32))), 422, "non_finite"),
        ("POST", upload, raw(values(big)), 422, "norm_exceeds_clip"),
        ("POST", upload, raw(values(np.full(n, 1e30, np.float32))), 422, "value_out_of_range"),
        ("POST", upload, raw(values(np.zeros(n, np.float32), spec="0" * 64)), 422, "wrong_spec"),
        ("POST", upload, raw(save({"delta": np.zeros(n, np.float32)})), 422, "malformed_update"),
        ("POST", upload, raw(good[:len(good) // 2]), 422, "malformed_update"),
        ("POST", upload, raw(b"\x00" * 100), 422, "malformed_update"),
        ("POST", upload, raw(b"\x00" * 5000), 413, "payload_too_large"),
        ("POST", upload.replace("model_version=0", "model_version=3"), raw(good), 409,
         "wrong_model_version"),
        ("POST", upload.replace("num_examples=5", "num_examples=0"), raw(good), 400, "invalid_field"),
        ("POST", upload.replace("num_examples=5", "num_examples=1001"), raw(good), 422,
         "weight_out_of_range"),
        ("POST", upload.replace("num_examples=5", "num_examples=1000000"), raw(good), 422,
         "weight_out_of_range"),
        ("POST", upload.replace("num_examples=5", "num_examples=five"), raw(good), 400, "invalid_field"),
        ("POST", upload.replace("num_examples=5", "num_examples=" + "9" * 80), raw(good), 400,
         "invalid_field"),
        ("POST", upload + "&metrics=%7Bbad", raw(good), 400, "malformed_json"),
        ("POST", upload + "&metrics=" + quote('{"loss": "high"}'), raw(good), 400, "invalid_field"),
        ("POST", upload + "&metrics=" + quote('{"loss": Infinity}'), raw(good), 400, "malformed_json"),
        ("POST", f"/v1/sessions/{sid}/update", raw(good), 400, "missing_field"),
        ("POST", f"/v1/sessions/{sid}/eval", js(eval_body), 409, "wrong_task"),
        ("POST", f"/v1/sessions/{sid}/failure", js({"reason": "bored"}), 400, "invalid_field"),
        ("POST", f"/v1/sessions/{sid}/failure", js({"reason": "error", "detail": 5}), 400, "invalid_field"),
        ("GET", "/v1/artifacts/" + "0" * 64, {}, 404, "unknown_artifact"),
        ("GET", mine.assignment["checkpoint"]["url"], {}, 404, "unknown_artifact"),   # not for anyone
        ("GET", "/v1/artifacts/../../etc/passwd", {}, 404, "not_found"),
        ("GET", "/v1/populations/en/app-model", {}, 404, "not_published"),
        ("GET", "/v1/populations/en/app-model/0", {}, 404, "not_published"),
        ("GET", "/v1/populations/en/app-model/99", {}, 404, "unknown_version"),
        ("GET", "/v1/populations/fr/rounds", op, 404, "unknown_population"),
        ("GET", "/v1/populations/en/rounds", {}, 401, "unauthorized"),
        ("GET", "/v1/populations/en/rounds/99", op, 404, "unknown_round"),
        ("GET", f"/v1/populations/en/rounds/{2**63}", op, 404, "not_found"),
        ("GET", f"/v1/populations/en/rounds/{10**40}", op, 404, "not_found"),
        ("GET", f"/v1/populations/en/app-model/{2**64}", {}, 404, "not_found"),
        ("GET", f"/v1/populations/en/rounds?before={2**63}", op, 400, "invalid_field"),
        ("GET", "/v1/populations/en/rounds?limit=0", op, 400, "invalid_field"),
        ("GET", "/v1/populations/fr/versions", op, 404, "unknown_population"),
        ("POST", "/v1/populations/en/devices/p-0000000000000000/revoke", op, 404, "not_found"),
        ("POST", "/v1/devices", js({"population": "en"}, None), 400, "missing_field"),
        ("POST", "/v1/enrollment/nonces", js({"population": "fr"}, None), 404, "unknown_population"),
        ("GET", "/v1/checkin", {}, 405, "method_not_allowed"),
        ("DELETE", "/v1/devices", {}, 405, "method_not_allowed"),
        ("GET", "/v2/anything", {}, 404, "not_found"),
    ]
    before = state_of(env)
    for method, path, kwargs, status, code in cases:
        reply = api.request(method, path, **kwargs)
        assert (reply.status, reply.body and reply.body.get("error")) == (status, code), (path, reply.body)
        assert isinstance(reply.body.get("message"), str) and reply.body["message"]
        assert state_of(env) == before, f"{method} {path} changed the stored state"


def test_eval_errors_and_operator_token(make_server):
    env = make_server(goal=1, over_selection=1.0, eval_every=1, server={"operator_token": "s3cret"})
    api = CheckedTransport(env.client, OpenAPIChecker(env.app))
    trainer = DeviceClient(api, "en", env.enrollment)
    trainer.checkin()
    trainer.upload(np.zeros(env.layout.size, np.float32), 1)
    dev = DeviceClient(api, "en", env.enrollment)
    dev.checkin()
    assert dev.assignment["task"] == "eval"
    sid = dev.assignment["session_id"]
    before = state_of(env)
    counts = {"model_version": 1, "top1_hits": 1, "top3_hits": 2, "positions": 9}
    for body, code in [({**counts, "top1_hits": 5}, "invalid_field"),
                       ({**counts, "top1_hits": -1}, "invalid_field"),
                       ({k: v for k, v in counts.items() if k != "positions"}, "missing_field"),
                       ({**counts, "model_version": 0}, "wrong_model_version")]:
        reply = api.request("POST", f"/v1/sessions/{sid}/eval", json=body, headers=dev.headers)
        assert reply.status in (400, 409) and reply.body["error"] == code
    assert state_of(env) == before
    assert api.request("GET", "/v1/populations/en/rounds").status == 401
    ok = api.request("GET", "/v1/populations/en/rounds", headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200 and len(ok.body["rounds"]) == 2


def test_fuzz_no_input_makes_a_5xx(server_env):
    client = server_env.client
    rng = np.random.default_rng(42)
    dev = DeviceClient(FlaskTransport(client), "en", server_env.enrollment)
    dev.checkin()
    sid = dev.assignment["session_id"]
    paths = ["/v1/devices", "/v1/checkin", f"/v1/sessions/{sid}/update", f"/v1/sessions/{sid}/eval",
             f"/v1/sessions/{sid}/failure", "/v1/artifacts/" + dev.assignment["checkpoint"]["sha256"],
             "/v1/populations/en/app-model", "/v1/populations/en/app-model/0", "/v1/populations/en/rounds",
             "/v1/populations/en/rounds/1", "/v1/populations/en/versions", "/openapi.json", "/healthz",
             "/v1/sessions/%00/update", "/v1/populations/%ff%fe/rounds", "/metrics", "/dashboard",
             "/dashboard/login", "/dashboard/p/en/rollback", "/dashboard/p/%ff/rounds/1"]
    values = [None, True, 0, -1, 2**70, 1.5, float("nan"), "", "x" * 300, [], {}, [1, {"a": None}],
              {"charging": "true"}, ELIGIBLE]
    queries = ["", "?model_version=0&num_examples=3", "?model_version=-1&num_examples=1e3",
               "?metrics=%5B%5D&model_version=0&num_examples=1", "?limit=abc&before=-5", "?metrics=nan"]
    auths = [{}, dev.headers, {"Authorization": "Bearer"}, {"Authorization": "Basic xyz"},
             {"Authorization": "Bearer :"}, {"Authorization": "Bearer \x00:\x00"}]
    for i in range(500):
        path = paths[rng.integers(len(paths))] + queries[rng.integers(len(queries))]
        method = ["GET", "POST", "PUT", "HEAD"][rng.integers(4)]
        kind = rng.integers(4)
        if kind == 0:
            body = rng.bytes(int(rng.integers(0, 400)))
        elif kind == 1:
            body = json.dumps({k: values[rng.integers(len(values))]
                               for k in ("population", "conditions", "reason", "detail", "model_version",
                                         "top1_hits", "top3_hits", "positions")
                               if rng.random() < 0.6}).encode()
        elif kind == 2:
            conditions = {k: values[rng.integers(len(values))] if rng.random() < 0.3 else v
                          for k, v in ELIGIBLE.items()}
            body = json.dumps({"population": "en", "conditions": conditions}).encode()
        else:
            body = save({"delta": rng.normal(size=int(rng.integers(1, 400))).astype(
                [np.float32, np.float64, np.int8][rng.integers(3)])})
        r = client.open(path, method=method, data=body, headers=auths[rng.integers(len(auths))])
        assert r.status_code < 500, (method, path, body[:100], r.get_data()[:300])
        if r.status_code >= 400 and method != "HEAD":
            assert set(r.get_json()) == {"error", "message"}
