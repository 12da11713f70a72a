"""The OpenAPI 3.1 description of every endpoint, served at /openapi.json.

OpenAPI 3.1 schemas are JSON Schema 2020-12, so the tests validate real
responses against them with `jsonschema` (tests/test_server_views.py), and a
test checks that every Flask route is documented here and vice versa.
"""
from __future__ import annotations

import functools

from server.aggregation import UPDATE_TENSOR
from server.reporting import FAILURE_REASONS

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
INT = {"type": "integer", "minimum": 0}
NUM = {"type": "number"}
NULLABLE_NUM = {"type": ["number", "null"]}
STR = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}


def _obj(required: dict, optional: dict | None = None, extra: bool = False) -> dict:
    return {"type": "object", "required": sorted(required),
            "properties": {**required, **(optional or {})}, "additionalProperties": extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    text = {400: "malformed JSON, a missing field or a value of the wrong type/range",
            401: "missing or wrong credentials", 403: "the session belongs to another device",
            404: "unknown session, population, version, round or artifact",
            405: "method not allowed", 409: "wrong model version or task, or the session already ended",
            413: "body larger than the limit", 422: "an update that cannot be aggregated"}
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


def _op(summary: str, responses: dict, *, body: dict | None = None, params: list | None = None,
        auth: str | None = "device", errors: tuple[int, ...] = ()) -> dict:
    op = {"summary": summary, "responses": {**responses, **_errors(*errors, 405)}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    if auth:
        op["security"] = [{auth: []}]
    return op


def _path_param(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict, required: bool = False, description: str = "") -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


ARTIFACT_REF = _obj({"url": STR, "sha256": SHA256})
BOOL = {"type": "boolean"}
CONDITIONS = _obj({"charging": BOOL, "idle": BOOL, "unmetered": BOOL,
                   "battery": {"type": "number", "minimum": 0, "maximum": 1},
                   "free_memory_mb": INT, "num_examples": INT,
                   "runtime_version": {"type": "string", "pattern": r"^\d+(\.\d+){0,3}$"}}, extra=True)
ASSIGNMENT = _obj({
    "session_id": STR, "task": {"enum": ["train", "eval"]}, "population": STR, "round": INT,
    "model_version": INT,
    "plan": {"oneOf": [{"type": "null"}, _obj({"url": STR, "sha256": SHA256, "manifest": ARTIFACT_REF})]},
    "checkpoint": ARTIFACT_REF, "vocab": {"oneOf": [{"type": "null"}, ARTIFACT_REF]},
    "hyperparameters": _obj({"learning_rate": NUM, "epochs": INT, "batch_size": INT, "seed": INT,
                             "max_examples": {"type": ["integer", "null"], "minimum": 1}}),
    "report_deadline": NUM, "report_deadline_in_s": NUM,
    "report": _obj({"url": STR, "failure_url": STR},
                   {"tensor": {"const": UPDATE_TENSOR}, "dtype": {"const": "float32"}, "size": INT}),
})
REJECTION = _obj({"reason": {"enum": ["ineligible", "round_full", "already_participated"]},
                  "retry_after_s": _obj({"min": NUM, "max": NUM})},
                 {"criteria": {"type": "array", "items": STR}})
ROUND = _obj({
    "round": INT, "task": {"enum": ["train", "eval"]},
    "state": {"enum": ["selecting", "reporting", "completed", "failed"]},
    "reason": {"type": ["string", "null"]}, "model_version": INT, "attempt": INT,
    "result_version": {"type": ["integer", "null"]}, "goal": INT, "max_selected": INT, "min_reports": INT,
    "selected": INT, "reported": INT, "aborted": INT, "failed": INT, "dropped": INT,
    "bytes_in": INT, "bytes_out": INT, "opened_at": NUM, "deadline": NUM, "closed_at": NULLABLE_NUM,
    "phases": _obj({"selection_s": NUM, "reporting_s": NUM, "finalize_s": NULLABLE_NUM}),
}, extra=True)
DEVICE_OUTCOME = _obj({
    "device_id": STR, "session_id": STR,
    "outcome": {"enum": ["assigned", "accepted", "aborted", "failed", "dropped"]},
    "reason": {"type": ["string", "null"]}, "assigned_at": NUM, "finished_at": NULLABLE_NUM,
    "num_examples": {"type": ["integer", "null"]}, "bytes_in": INT, "bytes_out": INT,
    "metrics": {"type": ["object", "null"]}})
NULLABLE_INT = {"type": ["integer", "null"]}
VERSION = _obj({"version": INT, "parent": NULLABLE_INT, "round": NULLABLE_INT,
                "checkpoint_sha256": SHA256, "created_at": NUM, "train": {"type": "object"},
                "eval": {"type": ["object", "null"]}, "published_at": NULLABLE_NUM,
                "app_manifest_sha256": {"oneOf": [{"type": "null"}, SHA256]}})
APP_MODEL = _obj({
    "population": STR, "version": INT, "published_at": NUM, "eval": {"type": ["object", "null"]},
    "manifest": ARTIFACT_REF, "model": {"oneOf": [{"type": "null"}, ARTIFACT_REF]},
    "vocab": {"oneOf": [{"type": "null"}, ARTIFACT_REF]},
    "files": {"type": "object", "additionalProperties": _obj(
        {"url": STR, "sha256": SHA256}, {"bytes": {"type": ["integer", "null"]}})}})
OUTCOME = _obj({"status": {"enum": ["accepted", "aborted", "recorded"]}, "round": INT}, {"reason": STR})

SCHEMAS = {
    "Error": _obj({"error": STR, "message": STR}),
    "Registration": _obj({"device_id": STR, "secret": STR}),
    "CheckinRequest": _obj({"population": STR, "conditions": _ref("Conditions")}, extra=True),
    "Conditions": CONDITIONS,
    "CheckinResponse": {"oneOf": [_obj({"assignment": _ref("Assignment")}),
                                  _obj({"rejection": _ref("Rejection")})]},
    "Assignment": ASSIGNMENT, "Rejection": REJECTION, "Outcome": OUTCOME,
    "EvalRequest": _obj({"model_version": INT, "top1_hits": INT, "top3_hits": INT, "positions": INT},
                        {"loss_sum": {"type": "number", "minimum": 0}}, extra=True),
    "FailureRequest": _obj({"reason": {"enum": list(FAILURE_REASONS)}},
                           {"detail": {"type": "string", "maxLength": 500}}, extra=True),
    "AppModel": APP_MODEL,
    "Round": ROUND,
    "RoundDetail": {"allOf": [ROUND, _obj({
        "hyperparameters": {"type": "object"},
        "failure_reasons": {"type": "object", "additionalProperties": INT},
        "devices": {"type": "array", "items": DEVICE_OUTCOME}}, extra=True)]},
    "RoundList": _obj({"rounds": {"type": "array", "items": _ref("Round")}}),
    "VersionList": _obj({"versions": {"type": "array", "items": VERSION}}),
}

UPLOAD_DOC = f"""The session's model update. Body: a safetensors file holding exactly one tensor,
"{UPDATE_TENSOR}", float32, shape [N] (N = the assignment's report.size): the trained weights minus
the downloaded checkpoint's, flattened in the checkpoint's weight layout order. Metadata goes in the
query string. Idempotent per session: a repeated upload gets the first answer and is counted once.
"accepted": the update is part of the round. "aborted": the round closed or has its reports; the
device drops the work. A 4xx error changes nothing; the device may upload a corrected update."""
POPULATION = _path_param("population", STR)
SESSION = _path_param("session_id", STR)
LIST_PARAMS = [POPULATION, _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
               _query("before", INT)]


@functools.cache
def openapi_document() -> dict:
    outcome = {"200": _json(_ref("Outcome"), "accepted, aborted or recorded")}
    paths = {
        "/v1/devices": {"post": _op("Register a device: returns its id and secret.",
                                    {"201": _json(_ref("Registration"), "the new device's credentials")},
                                    auth=None, errors=(413,))},
        "/v1/checkin": {"post": _op(
            "Check in with the device's conditions: an assignment, or a rejection with a retry window.",
            {"200": _json(_ref("CheckinResponse"), "assignment or rejection")},
            body={"application/json": {"schema": _ref("CheckinRequest")}}, errors=(400, 401, 404, 413))},
        "/v1/sessions/{session_id}/update": {"post": _op(
            UPLOAD_DOC, outcome, body={"application/octet-stream": {"schema": BINARY}},
            params=[SESSION,
                    _query("model_version", INT, True, "the model version the session trained"),
                    _query("num_examples", {"type": "integer", "minimum": 1}, True,
                           "local examples trained on: the update's weight"),
                    {"name": "metrics", "in": "query", "required": False,
                     "description": "training metrics, a JSON object of numbers (e.g. loss)",
                     "content": {"application/json": {"schema": {
                         "type": "object", "additionalProperties": {"type": "number"}}}}}],
            errors=(400, 401, 403, 404, 409, 413, 422))},
        "/v1/sessions/{session_id}/eval": {"post": _op(
            "Report an evaluation task's summed counts (contract.metrics: hits and positions).", outcome,
            body={"application/json": {"schema": _ref("EvalRequest")}}, params=[SESSION],
            errors=(400, 401, 403, 404, 409, 413))},
        "/v1/sessions/{session_id}/failure": {"post": _op(
            "Report why the device stopped the task (counted in round analytics).", outcome,
            body={"application/json": {"schema": _ref("FailureRequest")}}, params=[SESSION],
            errors=(400, 401, 403, 404, 409, 413))},
        "/v1/artifacts/{sha256}": {"get": _op(
            "A plan, checkpoint, app model, vocabulary or manifest by sha256 (immutable; ETag = hash).",
            {"200": {"description": "the bytes", "headers": {"ETag": {"schema": STR}},
                     "content": {"application/octet-stream": {"schema": BINARY}}},
             "304": {"description": "not modified (If-None-Match matched)"}},
            params=[_path_param("sha256", STR)], auth=None, errors=(404,))},
        "/v1/populations/{population}/app-model": {"get": _op(
            "The latest published app model: manifest and file URLs.",
            {"200": _json(_ref("AppModel"), "published app model")}, params=[POPULATION], auth=None,
            errors=(404,))},
        "/v1/populations/{population}/app-model/{version}": {"get": _op(
            "A published app model by version number.", {"200": _json(_ref("AppModel"), "app model")},
            params=[POPULATION, _path_param("version", INT)], auth=None, errors=(404,))},
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
        "/openapi.json": {"get": _op("This document.", {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                                     auth=None)},
        "/healthz": {"get": _op("Liveness.", {"200": _json(_obj({"status": {"const": "ok"}}), "ok")},
                                auth=None)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nightjar federated learning server", "version": "1",
                 "description": "Device protocol (register, check-in, artifacts, reports), app models "
                                "and round analytics. Every error is JSON {error, message}. URLs in "
                                "responses are relative to the server."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "device": {"type": "http", "scheme": "bearer",
                           "description": "Bearer <device_id>:<secret> from POST /v1/devices"},
                "operator": {"type": "http", "scheme": "bearer",
                             "description": "Bearer <operator_token> when the server config sets one"}},
        },
    }
