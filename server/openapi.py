"""The OpenAPI 3.1 description of every endpoint, served at /openapi.json.

Request and response bodies of the device protocol are the contract's own
schemas (contract.protocol.wire, contract.update.spec), the very objects the server
checks requests with, so the document cannot drift from what the server
enforces; the error codes come from contract.protocol.errors and the limits from the
running server's config (the defaults where none is given), so that every body
the document allows fits under the body cap. Its prose is server.openapi_prose.
A test validates real responses against it (OpenAPI 3.1 schemas are JSON
Schema 2020-12) and checks every Flask route is in it; `make fuzz` runs
schemathesis with every check against it.
"""
from __future__ import annotations

import copy
import functools

from contract.protocol import version, wire
from contract.protocol.errors import STATUS_MEANING, ErrorCode
from contract.artifacts.manifest import manifest_schema
from contract.secagg.masking import WORD_MODULUS
from contract.tasks.personal import PersonalEvalReport
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus, items_within
from contract.protocol.schema import MAX_INT, NO_NUL
from contract.update.spec import ROUND_SPEC
from server import openapi_prose as prose
from server.config import ServerConfig

INT = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
NUM = {"type": "number"}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}
STR = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _obj(required: dict, optional: dict | None = None, extra: bool = False) -> dict:
    return {"type": "object", "required": sorted(required),
            "properties": {**required, **(optional or {})}, "additionalProperties": extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    out = {}
    for status in statuses:
        codes = [c.value for c in ErrorCode if c.status == status]
        out[str(status)] = _json(_ref("Error"), f"{STATUS_MEANING[status]} (error: {', '.join(codes)})")
    return out


def protocol_header(required: bool) -> dict:
    """The `Nightjar-Protocol` header parameter: each served version, spelled as the server reads it."""
    lo, hi = version.SUPPORTED
    rule = ("required: without it, or with a version the server does not serve, the answer is 400 "
            "unsupported_protocol" if required else
            "optional on this public read (apps and CDNs fetch it): absent is fine, but a version the "
            "server does not serve is 400 unsupported_protocol")
    return {"name": version.HEADER, "in": "header", "required": required,
            "schema": {"type": "string", "enum": [str(v) for v in range(lo, hi + 1)]},
            "description": f"the protocol version the device speaks ({rule}; see the document's description)"}


def _op(summary: str, responses: dict, *, body: dict | None = None, params: list | None = None,
        auth: str | None = "device", errors: tuple[int, ...] = (), description: str | None = None,
        protocol: str | None = None) -> dict:
    """One operation. `protocol`: "required" (the device API) or "optional" (public reads) adds the
    Nightjar-Protocol header and the 400 it can cause (server.app.protocol_rule says the same)."""
    # What the HTTP layer (server/worker.py, Flask) can answer to any operation: 400 (a malformed
    # request), 405 (another method, OPTIONS too), 408 (a request that did not arrive in time), 413 (a
    # body over the route's limit) and the refusals of a request line or headers over their limits
    # (414, 431).
    if protocol is not None:
        params = [*(params or []), protocol_header(protocol == "required")]
    op = {"summary": summary, "responses": {**responses, **_errors(*sorted({*errors, *HTTP_LAYER}))}}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    if auth:
        op["security"] = [{auth: []}]
    return op


HTTP_LAYER = (400, 405, 408, 413, 414, 431)


def _path_param(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _text(max_len: int) -> dict:
    """A path parameter's text: no NUL (400 at the door), at most `max_len` characters."""
    return {"type": "string", "maxLength": max_len, "pattern": NO_NUL}


def _query(name: str, schema: dict, required: bool = False, description: str = "") -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


# Operator views (server-side only: no device parses them).
ROUND = _obj({
    "round": INT, "task": {"enum": list(wire.TASKS)},
    "state": {"enum": ["selecting", "reporting", "completed", "failed"]},
    "reason": {"type": ["string", "null"]}, "model_version": INT, "attempt": INT,
    "result_version": NULLABLE_INT, "goal": INT, "max_selected": INT, "min_reports": INT,
    "selected": INT, "reported": INT, "aborted": INT, "failed": INT, "dropped": INT,
    "bytes_in": INT, "bytes_out": INT, "opened_at": NUM, "deadline": NUM, "closed_at": NULLABLE_NUM,
    "phases": _obj({"selection_s": NUM, "reporting_s": NUM, "finalize_s": NULLABLE_NUM}),
}, extra=True)
DEVICE_OUTCOME = _obj({
    "device": {"type": "string", "pattern": "^p-[0-9a-f]{16}$",
               "description": "the device's pseudonym (a keyed hash of its id)"}, "session_id": STR,
    "outcome": {"enum": ["assigned", "accepted", "aborted", "failed", "dropped"]},
    "reason": {"type": ["string", "null"]}, "assigned_at": NUM, "finished_at": NULLABLE_NUM,
    "num_examples": NULLABLE_INT, "bytes_in": INT, "bytes_out": INT,
    "metrics": {"type": ["object", "null"]}})
OPTIONAL_NUM = {"type": ["number", "null"]}
TRAIN = {"type": "object", "description": prose.TRAIN, "properties": {
    "source": STR, "new_words": INT, "reports": INT, "zeroed": INT, "examples": NUM, "mean_delta_norm": NUM,
    "update_bits": INT, "secure_aggregation": {"type": "boolean"},
    "optimizer": {"enum": ["sgd", "sgdm", "adam", "yogi"]}, "server_lr": NUM, "server_momentum": OPTIONAL_NUM,
    "server_beta_1": NUM, "server_beta_2": NUM, "server_epsilon": NUM, "server_initial_preconditioner": NUM,
    "dp_clip": NUM, "dp_unclipped": NUM, "dp_mechanism": {"enum": ["central", "distributed", "ftrl"]},
    "dp_stddev": NUM, "dp_denominator": INT, "dp_count_stddev": NUM,
    **{name: NUM for name in wire.METRIC_NAMES}}}
VERSION = _obj({"version": INT, "parent": NULLABLE_INT, "round": NULLABLE_INT,
                "checkpoint_sha256": SHA256, "created_at": NUM, "train": TRAIN,
                "eval": {"type": ["object", "null"]}, "published_at": NULLABLE_NUM,
                "app_manifest_sha256": {"oneOf": [{"type": "null"}, SHA256]},
                "vocab_sha256": {"oneOf": [{"type": "null"}, SHA256]},
                "dp": {"oneOf": [{"type": "null"}, wire.PRIVACY.schema()]},
                "canary": {"oneOf": [{"type": "null"}, _obj({
                    "suggestions": {"type": "object", "additionalProperties": {"type": "string"}},
                    "changed": {"type": "object", "additionalProperties": {
                        "type": "array", "items": {"type": "string"}}}})]}})

SCHEMAS = {
    "Error": wire.ERROR.schema(),
    "NonceRequest": wire.NONCE_REQUEST.schema(),
    "Nonce": wire.Nonce.SCHEMA.schema(),
    "RegistrationRequest": wire.REGISTRATION_REQUEST.schema(),
    "Registration": wire.Registration.SCHEMA.schema(),
    "Revocation": _obj({"device": STR, "revoked": {"const": True}, "already_revoked": {"type": "boolean"}}),
    "CheckinRequest": wire.CHECKIN_REQUEST.schema(),
    "CheckinResponse": wire.CHECKIN_RESPONSE,
    "Assignment": wire.ASSIGNMENT.schema(), "Rejection": wire.Rejection.SCHEMA.schema(),
    "UpdateSpec": ROUND_SPEC.schema(),
    "Outcome": wire.Outcome.SCHEMA.schema(),
    "EvalReport": wire.EvalReport.SCHEMA.schema(),
    "PersonalEvalReport": PersonalEvalReport.SCHEMA.schema(),
    "FailureReport": wire.FailureReport.SCHEMA.schema(),
    "DiscoveryBallot": wire.DiscoveryBallot.SCHEMA.schema(),
    "Metrics": wire.METRICS.schema(),
    "AppModel": wire.APP_MODEL.schema(),
    "Manifest": manifest_schema(),
    "Round": ROUND,
    "RoundDetail": {"allOf": [ROUND, _obj({
        "hyperparameters": {"type": "object"},
        "update": {"oneOf": [{"type": "null"}, _ref("UpdateSpec")]},
        "failure_reasons": {"type": "object", "additionalProperties": INT},
        "zeroed": INT,
        "personalization": {"type": ["object", "null"]},
        "secagg": {"oneOf": [{"type": "null"}, _obj({
            "phase": {"enum": ["keys", "shares", "masking", "unmasking", "done", "failed"]},
            "k": NULLABLE_INT, "t": NULLABLE_INT, "members": INT, "shared": INT, "survivors": INT,
            "reason": {"type": ["string", "null"]},
            "wrong_revealers": {"type": "array", "items": {"type": "string"},
                                "description": "pseudonyms of the devices whose revealed shares were wrong "
                                               "(corrected, or the round failed unmask_failed)"}})]},
        "devices": {"type": "array", "items": DEVICE_OUTCOME}}, extra=True)]},
    "RoundList": _obj({"rounds": {"type": "array", "items": _ref("Round")}}),
    "SecAggKeys": SecAggKeys.SCHEMA.schema(), "SecAggShares": SecAggShares.SCHEMA.schema(),
    "SecAggReveal": SecAggReveal.SCHEMA.schema(), "SecAggStatus": SecAggStatus.SCHEMA.schema(),
    "Recorded": _obj({"status": {"const": "recorded"}}),
    "VersionList": _obj({"versions": {"type": "array", "items": VERSION}}),
}

POPULATION = _path_param("population", _text(64))
SESSION = _path_param("session_id", _text(64))
LIST_PARAMS = [POPULATION, _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
               _query("before", INT)]


# A valid body of each device report, for client authors (and schemathesis' examples phase).
EXAMPLES = {
    "NonceRequest": {"population": "en"},
    "CheckinRequest": {"population": "en", "conditions": {
        "charging": True, "unmetered": True, "idle": True, "battery": 0.9, "free_memory_mb": 3072,
        "num_examples": 412, "runtime_version": "1.2.0"}},
    "EvalReport": {"model_version": 3, "top1_hits": 120, "top3_hits": 210, "positions": 400, "loss_sum": 1234.5},
    "DiscoveryBallot": {"model_version": 3, "votes": ["th", "the$"]},
    "FailureReport": {"reason": "unplugged"},
}


def secagg_paths() -> dict:
    """Secure aggregation's operations on a session (server/views/secagg.py)."""
    recorded = {"200": _json(_ref("Recorded"), "recorded")}
    errors = (400, 401, 403, 404, 409, 413, 415, 422, 429)
    out = {"/v1/sessions/{session_id}/secagg": {"get": {"operationId": "secagg_status", **_op(
        "Secure aggregation: this session's phase and what it needs.", {"200": _json(_ref("SecAggStatus"),
                                                                                      "the phase")},
        params=[SESSION], errors=(401, 403, 404, 409, 429), description=prose.SECAGG, protocol="required")}}}
    for phase, body, summary in (("keys", "SecAggKeys", "Advertise keys (phase keys)."),
                                 ("shares", "SecAggShares", "Send each neighbour its encrypted shares (phase shares)."),
                                 ("reveal", "SecAggReveal", "Reveal the shares asked for (phase unmasking).")):
        out[f"/v1/sessions/{{session_id}}/secagg/{phase}"] = {"post": _op(
            summary, recorded, body={"application/json": {"schema": _ref(body)}}, params=[SESSION],
            errors=errors, protocol="required")}
    return out


def openapi_document(config: ServerConfig | None = None) -> dict:
    """The document for a server of `config` (its body limits; the defaults if None)."""
    limits = config or ServerConfig()
    return _document(limits.max_json_bytes, limits.max_upload_bytes)


def _schemas(max_json_bytes: int) -> dict:
    """The component schemas, with what depends on the JSON body cap and what the contract's types
    cannot say (a masked personal report's words are below 2^32) added."""
    schemas = copy.deepcopy(SCHEMAS)
    for name, message, text in (("SecAggShares", SecAggShares, prose.SHARES),
                                ("SecAggReveal", SecAggReveal, prose.REVEAL)):
        shares = schemas[name]["properties"]["shares"]
        shares["maxItems"] = items_within(message, max_json_bytes)
        shares["description"] = text
    schemas["PersonalEvalReport"]["if"] = {"properties": {"masked": {"const": True}}, "required": ["masked"]}
    schemas["PersonalEvalReport"]["then"] = {"properties": {"counts": {"items": {"maximum": WORD_MODULUS - 1}}}}
    return schemas


@functools.cache
def _document(max_json_bytes: int, max_upload_bytes: int) -> dict:
    outcome = {"200": _json(_ref("Outcome"), "accepted, aborted or recorded")}
    json_body = lambda name: {"application/json": {"schema": _ref(name), **(   # noqa: E731
        {"example": EXAMPLES[name]} if name in EXAMPLES else {})}}
    paths = {
        "/v1/enrollment/nonces": {"post": _op(
            "Enrollment, step 1: a fresh single-use nonce for the device's attestation.",
            {"201": _json(_ref("Nonce"), "the nonce")}, body=json_body("NonceRequest"), auth=None,
            errors=(400, 401, 404, 413, 415, 429), description=prose.ENROLLMENT, protocol="required")},
        "/v1/devices": {"post": _op(
            "Enrollment, step 2: register with the app credential and an attestation of the nonce.",
            {"201": {**_json(_ref("Registration"), "the new device's credentials"), "links": {
                "CheckIn": {"operationId": "checkin",
                            "parameters": {"header.Authorization": "$response.body#/authorization"}}}}},
            body=json_body("RegistrationRequest"), auth=None, errors=(400, 401, 404, 413, 415, 429),
            description=prose.ENROLLMENT, protocol="required")},
        "/v1/checkin": {"post": {**_op(
            "Check in with the device's conditions: an assignment, or a rejection with a retry window.",
            {"200": {**_json(_ref("CheckinResponse"), "assignment or rejection"), "links": {
                "Upload": {"operationId": "upload", "parameters": {
                    "path.session_id": "$response.body#/assignment/session_id",
                    "query.model_version": "$response.body#/assignment/model_version",
                    "header.Authorization": "$request.header.Authorization"}},
                **{name: {"operationId": op, "parameters": {
                    "path.session_id": "$response.body#/assignment/session_id",
                    "header.Authorization": "$request.header.Authorization"}}
                   for name, op in (("ReportEval", "report_eval"), ("ReportPersonal", "report_personal"),
                                    ("ReportFailure", "report_failure"),
                                    ("ReportDiscovery", "report_discovery"), ("SecAggStatus", "secagg_status"))}}}},
            body=json_body("CheckinRequest"), errors=(400, 401, 403, 404, 413, 415, 429), protocol="required"),
            "operationId": "checkin"}},
        "/v1/sessions/{session_id}/update": {"post": {"operationId": "upload", **_op(
            "Upload the session's encoded model update.", outcome, description=prose.UPLOAD,
            body={"application/octet-stream": {"schema": {**BINARY, "maxLength": max_upload_bytes}}},
            params=[SESSION,
                    _query("model_version", INT, True, "the model version the session trained"),
                    _query("num_examples", {"type": "integer", "minimum": 1, "maximum": 2**31}, True,
                           "the update's weight: local examples trained on, at most the spec's max_weight"),
                    {"name": "metrics", "in": "query", "required": False,
                     "description": "training metrics, a JSON object of finite numbers (e.g. loss)",
                     "content": {"application/json": {"schema": _ref("Metrics")}}}],
            errors=(400, 401, 403, 404, 409, 413, 415, 422, 429), protocol="required")}},
        **secagg_paths(),
        "/v1/sessions/{session_id}/eval": {"post": {"operationId": "report_eval", **_op(
            "Report an evaluation task's summed counts (contract.model.metrics: hits and positions).", outcome,
            body=json_body("EvalReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415),
            protocol="required")}},
        "/v1/sessions/{session_id}/personal": {"post": {"operationId": "report_personal", **_op(
            "Report a personalize task's counts: one contract.tasks.personal.PersonalReport vector (the server adds "
            "it to the round's sum and keeps no device's own).", outcome,
            body=json_body("PersonalEvalReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415),
            protocol="required")}},
        "/v1/sessions/{session_id}/discovery": {"post": {"operationId": "report_discovery", **_op(
            "Report a discover task's votes: prefixes of the device's own new words, each one character "
            "longer than one the assignment named (contract.tasks.discovery).", outcome,
            body=json_body("DiscoveryBallot"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415, 422),
            protocol="required")}},
        "/v1/sessions/{session_id}/failure": {"post": {"operationId": "report_failure", **_op(
            "Report why the device stopped the task: a reason code, nothing else (no free text).", outcome,
            body=json_body("FailureReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415),
            protocol="required")}},
        "/v1/artifacts/{sha256}": {"get": _op(
            "A plan, checkpoint, app model, vocabulary or manifest by sha256 (immutable; ETag = hash).",
            {"200": {"description": "the bytes", "headers": {"ETag": {"schema": STR}},
                     "content": {"application/octet-stream": {"schema": BINARY}}},
             "304": {"description": "not modified (If-None-Match matched)"}},
            params=[_path_param("sha256", _text(200))], auth=None,
            errors=(401, 403, 404, 429), description=prose.CHECKPOINT, protocol="optional")},
        "/v1/populations/{population}/app-model": {"get": _op(
            "The latest published app model: manifest and file URLs.",
            {"200": _json(_ref("AppModel"), "published app model")}, params=[POPULATION], auth=None,
            errors=(404,), protocol="optional")},
        "/v1/populations/{population}/app-model/{version}": {"get": _op(
            "A published app model by version number.", {"200": _json(_ref("AppModel"), "app model")},
            params=[POPULATION, _path_param("version", INT)], auth=None, errors=(404,), protocol="optional")},
        "/v1/populations/{population}/rounds": {"get": _op(
            "Operator: round summaries, newest first.", {"200": _json(_ref("RoundList"), "rounds")},
            params=LIST_PARAMS, auth="operator", errors=(400, 401, 404))},
        "/v1/populations/{population}/rounds/{number}": {"get": _op(
            "Operator: one round with each device's outcome.", {"200": _json(_ref("RoundDetail"), "round")},
            params=[POPULATION, _path_param("number", INT)], auth="operator", errors=(401, 404))},
        "/v1/populations/{population}/versions": {"get": _op(
            "Operator: model versions, newest first (lineage, metrics, publication).",
            {"200": _json(_ref("VersionList"), "versions")}, params=LIST_PARAMS, auth="operator",
            errors=(400, 401, 404))},
        "/v1/populations/{population}/discovery": {"get": _op(
            "Operator: federated discovery of new words: the pass and level in progress, and every word "
            "found so far (each typed by at least min_devices devices).",
            {"200": _json(_obj({"pass": INT, "level": INT, "words": {"type": "array", "items": STR}}),
                          "discovery")}, params=[POPULATION], auth="operator", errors=(401, 404))},
        "/v1/populations/{population}/privacy": {"get": _op(
            "Operator: the differential-privacy ledger (server.privacy): the DP setting and budget, the "
            "current adaptive clip, each recorded round's event and the (ε, δ) spent so far; "
            "{\"dp\": null} for a population without DP.",
            {"200": _json(_obj({"dp": {"type": ["object", "null"]}}), "ledger")}, params=[POPULATION],
            auth="operator", errors=(401, 404))},
        "/v1/populations/{population}/devices/{pseudonym}/revoke": {"post": _op(
            "Operator: revoke a device (named by its pseudonym): its calls are refused from now on (403) "
            "and its open sessions end.", {"200": _json(_ref("Revocation"), "revoked")},
            params=[POPULATION, _path_param("pseudonym", _text(40))],
            auth="operator", errors=(401, 404))},
        "/openapi.json": {"get": _op("This document.", {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                                     auth=None)},
        "/metrics": {"get": _op(
            "Operator: Prometheus metrics in the text format, summed over every gunicorn worker "
            "(server.metrics): check-ins, uploads, failures, bytes, request latency, round phases, and gauges "
            "of the open round's reports and the ε spent.",
            {"200": {"description": "Prometheus text format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}}, auth="operator", errors=(401,))},
        "/healthz": {"get": _op("Liveness.", {"200": _json(_obj({"status": {"const": "ok"}}), "ok")},
                                auth=None)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nightjar federated learning server", "version": "3",
                 "x-nightjar-protocol": {"header": version.HEADER, "current": version.CURRENT,
                                         "supported": {"min": version.SUPPORTED[0], "max": version.SUPPORTED[1]}},
                 "description": prose.info(max_json_bytes, max_upload_bytes)},
        "paths": paths,
        "components": {
            "schemas": _schemas(max_json_bytes),
            "securitySchemes": {
                "device": {"type": "http", "scheme": "bearer",
                           "description": "Bearer <device_id>:<secret> from POST /v1/devices"},
                "operator": {"type": "http", "scheme": "bearer",
                             "description": "Bearer <operator_token> when the server config sets one"}},
        },
    }
