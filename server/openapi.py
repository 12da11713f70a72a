"""The OpenAPI 3.1 description of every endpoint, served at /openapi.json.

Request and response bodies of the device protocol are the contract's own
schemas (contract.protocol.wire, contract.update.spec), the very objects the server
checks requests with, so the document cannot drift from what the server
enforces; the error codes come from contract.protocol.errors and the limits from the
config defaults. A test validates real responses against it (OpenAPI 3.1
schemas are JSON Schema 2020-12) and checks every Flask route is in it.
"""
from __future__ import annotations

import functools

from contract.protocol import wire
from contract.protocol.errors import STATUS_MEANING, ErrorCode
from contract.artifacts.manifest import manifest_schema
from contract.tasks.personal import PersonalEvalReport
from contract.update.pipeline import FORMAT
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
from contract.protocol.schema import MAX_INT
from contract.update.spec import ROUND_SPEC
from server.config import ServerConfig
from server.worker import BODY_IDLE_S, HEAD_TIMEOUT_S

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


def _op(summary: str, responses: dict, *, body: dict | None = None, params: list | None = None,
        auth: str | None = "device", errors: tuple[int, ...] = (), description: str | None = None) -> dict:
    # 405 (another method, OPTIONS too), 408 (a request that did not arrive in time) and the
    # refusals of a request line or headers over their limits (414, 431), all written by
    # server/worker.py or Flask, can answer any operation.
    op = {"summary": summary, "responses": {**responses, **_errors(*errors, 405, 408, 414, 431)}}
    if description:
        op["description"] = description
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
VERSION = _obj({"version": INT, "parent": NULLABLE_INT, "round": NULLABLE_INT,
                "checkpoint_sha256": SHA256, "created_at": NUM, "train": {"type": "object"},
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

UPLOAD_DOC = f"""The session's model update, encoded as the assignment's `update` spec says
(contract.update.pipeline). The update is the trained weights minus the downloaded checkpoint's, as one
flat vector in the order of the assignment's `layout` (the checkpoint's tensors in layout order,
each flattened row-major; not the alphabetical order safetensors stores them in). The device then:
caps its weight at `max_weight` (or uses 1 for uniform weighting) and scales the update by
weight / max_weight; scales it to L2 norm <= `clip_norm`; with `rotation`, pads it to whole blocks
of `block_size`, permutes it, flips signs and applies the orthonormal Hadamard transform per block
(permutation and signs from `numpy.random.default_rng([rotation_seed, 0x48414441])`); for
`bits` < 32, pads to whole blocks and, per block, picks the smallest power-of-two scale 2^e with
max|value| <= L·2^e (L = 2^(bits-1) - 1) and rounds value/2^e stochastically to an integer in
-L..L (uniforms from `numpy.random.default_rng([hyperparameters.seed, 0x53524E44])`).

Body: a safetensors file with metadata {{"format": "{FORMAT}", "bits": "<bits>", "spec":
"<update.fingerprint>"}} and, for bits = 32, one tensor "values" float32 [size]; otherwise "codes"
uint8 (the integers + L, packed low bits first: 2 bits = 4 per byte, 4 bits = 2 per byte, 16 bits
= 2 bytes little-endian each) and "scales" float32 [padded size / block_size] (each a power of
two). `num_examples` in the query is the weight. Under secure aggregation (`secure_aggregation`
in the spec; SECAGG_DOC) the body instead holds "masked" uint8 (the masked integers, modulus_bits
each, packed low bits first) and "weight" uint32 [1], metadata "modulus_bits", and the query has
no num_examples nor metrics. The server refuses with a 422 naming the limit:
a weight outside [1, max_weight], a decoded L2 norm above clip_norm, a code above 2L, a scale that
is not a power of two in range, a wrong length or width, another round's spec. Idempotent per
session: a repeated upload gets the first answer and is counted once. "accepted": the update is
part of the round. "aborted": the round closed or has its reports; the device drops the work. A
4xx error changes nothing; the device may upload a corrected update."""
ENROLLMENT_DOC = """A device enrolls once per population. It asks for a nonce, has its platform's
attestation service (Play Integrity, App Attest; a development issuer stands in) sign a statement
naming the population and the nonce (contract/protocol/attestation.py: canonical JSON {app_id, issued_at,
nonce, population, verdict, version}, base64url, with an Ed25519 signature of those bytes), and sends
it with the app's credential. The nonce works once and expires; the statement must come from the
configured issuer and say MEETS_DEVICE_INTEGRITY. Both calls are rate-limited per address (429 with
Retry-After)."""
SECAGG_DOC = """Secure aggregation (SecAgg+, Bell et al. 2020; contract/secagg/masking.py) when the
assignment's update has `secure_aggregation`: the server learns only the sum of the round's updates.
The device polls GET .../secagg, which names the session's phase and, when there is something to
do, what it needs: keys (POST .../secagg/keys: two X25519 public keys and a SHA-256 commitment to a
self-mask seed) → shares (the device's number, t and its neighbours' keys; POST .../secagg/shares:
for each neighbour the Shamir shares of the seed and of the masking private key, AES-256-GCM
encrypted under HKDF-SHA256 of the pairwise X25519 secret) → masking (the inbox of shares sent to
it; the device adds its masks, AES-256-CTR keystreams, and uploads to .../update) → unmasking
(which neighbours survived and which dropped; POST .../secagg/reveal: their self-seed or
masking-key shares, never both for one) → done. `wait_s`: when to ask again. A message for
another phase is 409 wrong_phase; a session that left the masking set gets 409 not_in_cohort."""
CHECKPOINT_DOC = """A checkpoint (GET /v1/artifacts/<assignment.checkpoint.sha256>) is a safetensors file
of named float32 tensors whose metadata "layout" is the JSON of the flat layout ([{name, shape, offset}]);
"model_config", "round", "version" and "parent" are JSON strings too. A plan and an app model are
.tflite files described by a Manifest."""
POPULATION = _path_param("population", {"type": "string", "maxLength": 64})
SESSION = _path_param("session_id", {"type": "string", "maxLength": 64})
LIST_PARAMS = [POPULATION, _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
               _query("before", INT)]


def secagg_paths() -> dict:
    """Secure aggregation's operations on a session (server/views/secagg.py)."""
    recorded = {"200": _json(_ref("Recorded"), "recorded")}
    errors = (400, 401, 403, 404, 409, 413, 415, 422, 429)
    out = {"/v1/sessions/{session_id}/secagg": {"get": {"operationId": "secagg_status", **_op(
        "Secure aggregation: this session's phase and what it needs.", {"200": _json(_ref("SecAggStatus"),
                                                                                      "the phase")},
        params=[SESSION], errors=(401, 403, 404, 409, 429), description=SECAGG_DOC)}}}
    for phase, body, summary in (("keys", "SecAggKeys", "Advertise keys (phase keys)."),
                                 ("shares", "SecAggShares", "Send each neighbour its encrypted shares (phase shares)."),
                                 ("reveal", "SecAggReveal", "Reveal the shares asked for (phase unmasking).")):
        out[f"/v1/sessions/{{session_id}}/secagg/{phase}"] = {"post": _op(
            summary, recorded, body={"application/json": {"schema": _ref(body)}}, params=[SESSION],
            errors=errors)}
    return out


@functools.cache
def openapi_document() -> dict:
    limits = ServerConfig()
    outcome = {"200": _json(_ref("Outcome"), "accepted, aborted or recorded")}
    json_body = lambda name: {"application/json": {"schema": _ref(name)}}   # noqa: E731
    paths = {
        "/v1/enrollment/nonces": {"post": _op(
            "Enrollment, step 1: a fresh single-use nonce for the device's attestation.",
            {"201": _json(_ref("Nonce"), "the nonce")}, body=json_body("NonceRequest"), auth=None,
            errors=(400, 401, 404, 413, 415, 429), description=ENROLLMENT_DOC)},
        "/v1/devices": {"post": _op(
            "Enrollment, step 2: register with the app credential and an attestation of the nonce.",
            {"201": {**_json(_ref("Registration"), "the new device's credentials"), "links": {
                "CheckIn": {"operationId": "checkin",
                            "parameters": {"header.Authorization": "$response.body#/authorization"}}}}},
            body=json_body("RegistrationRequest"), auth=None, errors=(400, 401, 404, 413, 415, 429),
            description=ENROLLMENT_DOC)},
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
            body=json_body("CheckinRequest"), errors=(400, 401, 403, 404, 413, 415, 429)),
            "operationId": "checkin"}},
        "/v1/sessions/{session_id}/update": {"post": {"operationId": "upload", **_op(
            "Upload the session's encoded model update.", outcome, description=UPLOAD_DOC,
            body={"application/octet-stream": {"schema": {**BINARY, "maxLength": limits.max_upload_bytes}}},
            params=[SESSION,
                    _query("model_version", INT, True, "the model version the session trained"),
                    _query("num_examples", {"type": "integer", "minimum": 1, "maximum": 2**31}, True,
                           "the update's weight: local examples trained on, at most the spec's max_weight"),
                    {"name": "metrics", "in": "query", "required": False,
                     "description": "training metrics, a JSON object of finite numbers (e.g. loss)",
                     "content": {"application/json": {"schema": _ref("Metrics")}}}],
            errors=(400, 401, 403, 404, 409, 413, 415, 422, 429))}},
        **secagg_paths(),
        "/v1/sessions/{session_id}/eval": {"post": {"operationId": "report_eval", **_op(
            "Report an evaluation task's summed counts (contract.model.metrics: hits and positions).", outcome,
            body=json_body("EvalReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415))}},
        "/v1/sessions/{session_id}/personal": {"post": {"operationId": "report_personal", **_op(
            "Report a personalize task's counts: one contract.tasks.personal.PersonalReport vector (the server adds "
            "it to the round's sum and keeps no device's own).", outcome,
            body=json_body("PersonalEvalReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415))}},
        "/v1/sessions/{session_id}/discovery": {"post": {"operationId": "report_discovery", **_op(
            "Report a discover task's votes: prefixes of the device's own new words, each one character "
            "longer than one the assignment named (contract.tasks.discovery).", outcome,
            body=json_body("DiscoveryBallot"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415, 422))}},
        "/v1/sessions/{session_id}/failure": {"post": {"operationId": "report_failure", **_op(
            "Report why the device stopped the task: a reason code, nothing else (no free text).", outcome,
            body=json_body("FailureReport"), params=[SESSION], errors=(400, 401, 403, 404, 409, 413, 415))}},
        "/v1/artifacts/{sha256}": {"get": _op(
            "A plan, checkpoint, app model, vocabulary or manifest by sha256 (immutable; ETag = hash).",
            {"200": {"description": "the bytes", "headers": {"ETag": {"schema": STR}},
                     "content": {"application/octet-stream": {"schema": BINARY}}},
             "304": {"description": "not modified (If-None-Match matched)"}},
            params=[_path_param("sha256", {"type": "string", "maxLength": 200})], auth=None,
            errors=(401, 403, 404, 429), description=CHECKPOINT_DOC)},
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
            params=[POPULATION, _path_param("pseudonym", {"type": "string", "maxLength": 40})],
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
        "info": {"title": "Nightjar federated learning server", "version": "2",
                 "description": "Device protocol (register, check-in, artifacts, reports), app models "
                                "and round analytics. Every error is JSON {error, message}; the error "
                                "codes and their statuses are listed per operation. URLs in responses "
                                "are relative to the server. JSON bodies need Content-Type "
                                f"application/json and at most {limits.max_json_bytes} bytes; an update "
                                f"at most {limits.max_upload_bytes} bytes; a body over its limit, by "
                                "Content-Length or (chunked) by the chunks so far, is refused 413 with "
                                "Connection: close before the rest is read. A request head must arrive "
                                f"within {HEAD_TIMEOUT_S:g} s of its first byte and a body must not pause longer "
                                f"than {BODY_IDLE_S:g} s (408, Connection: close). OPTIONS is not served: 405 "
                                "with Allow naming the path's methods. Integers accept whole-number "
                                "floats (13468.0). No response holds NaN or Infinity."},
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
