"""Every error the protocol knows: one closed set of codes, each with its HTTP status.

The server raises `ProtocolError(code, message)` from its services (the Flask
views turn it into `{"error": code, "message": ...}` with the code's status);
the phone builds the same exception from an error answer it received. The
OpenAPI document lists this table, so a client author sees every code.
"""
from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    # 400: the request cannot be parsed or a value is out of its documented range
    BAD_REQUEST = "bad_request"
    MALFORMED_JSON = "malformed_json"
    INVALID_BODY = "invalid_body"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # Nightjar-Protocol missing or outside the served range
    # 401 / 403: who is asking
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_DEVICE = "unknown_device"
    BAD_CREDENTIAL = "bad_credential"              # enrollment: the app credential is not this population's
    BAD_ATTESTATION = "bad_attestation"            # enrollment: the statement or its signature does not verify
    BAD_NONCE = "bad_nonce"                        # enrollment: unknown, used, expired or another population's
    FORBIDDEN = "forbidden"
    NOT_YOUR_SESSION = "not_your_session"
    DEVICE_REVOKED = "device_revoked"
    WRONG_POPULATION = "wrong_population"          # the device was enrolled in another population
    # 404: what is asked for does not exist
    NOT_FOUND = "not_found"
    UNKNOWN_POPULATION = "unknown_population"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_ROUND = "unknown_round"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_ARTIFACT = "unknown_artifact"
    NOT_PUBLISHED = "not_published"
    # 405, 408, 411, 413, 414, 415, 431: HTTP itself
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    LENGTH_REQUIRED = "length_required"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    URI_TOO_LONG = "uri_too_long"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HEADERS_TOO_LARGE = "headers_too_large"
    # 409: well formed, but it does not fit the state
    CONFLICT = "conflict"
    WRONG_MODEL_VERSION = "wrong_model_version"
    WRONG_TASK = "wrong_task"
    SESSION_CLOSED = "session_closed"
    WRONG_PHASE = "wrong_phase"                    # secure aggregation: not what this phase takes
    NOT_IN_COHORT = "not_in_cohort"                # secure aggregation: the session left the masking set
    # 422: an update that cannot be aggregated (contract.update.pipeline says why)
    INVALID_UPDATE = "invalid_update"
    MALFORMED_UPDATE = "malformed_update"
    WRONG_SPEC = "wrong_spec"
    WRONG_WIDTH = "wrong_width"
    WRONG_LENGTH = "wrong_length"
    BAD_SCALE = "bad_scale"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    NON_FINITE = "non_finite"
    NORM_EXCEEDS_CLIP = "norm_exceeds_clip"
    WEIGHT_OUT_OF_RANGE = "weight_out_of_range"
    INVALID_KEYS = "invalid_keys"                  # secure aggregation: keys, shares or reveals that cannot be used
    # 429: too many requests from this device or address (Retry-After says when to come back)
    RATE_LIMITED = "rate_limited"
    # 500: a bug; never the answer to anything a client sends
    INTERNAL_ERROR = "internal_error"

    @property
    def status(self) -> int:
        return _STATUS[self]


_GROUPS = {
    400: ("bad_request", "malformed_json", "invalid_body", "missing_field", "invalid_field", "unsupported_protocol"),
    401: ("unauthorized", "unknown_device", "bad_credential", "bad_attestation", "bad_nonce"),
    403: ("forbidden", "not_your_session", "device_revoked", "wrong_population"),
    404: ("not_found", "unknown_population", "unknown_session", "unknown_round", "unknown_version",
          "unknown_artifact", "not_published"),
    405: ("method_not_allowed",), 408: ("request_timeout",), 411: ("length_required",),
    413: ("payload_too_large",), 414: ("uri_too_long",), 415: ("unsupported_media_type",),
    431: ("headers_too_large",),
    409: ("conflict", "wrong_model_version", "wrong_task", "session_closed", "wrong_phase", "not_in_cohort"),
    422: ("invalid_update", "malformed_update", "wrong_spec", "wrong_width", "wrong_length", "bad_scale",
          "value_out_of_range", "non_finite", "norm_exceeds_clip", "weight_out_of_range", "invalid_keys"),
    429: ("rate_limited",),
    500: ("internal_error",),
}
_STATUS: dict[ErrorCode, int] = {ErrorCode(code): status for status, codes in _GROUPS.items()
                                 for code in codes}
assert set(_STATUS) == set(ErrorCode), "every error code has an HTTP status"

# What the codes of each status mean, for the OpenAPI document.
STATUS_MEANING = {
    400: "malformed JSON, a missing field, a value of the wrong type or outside its documented range, text "
         "holding NUL (U+0000), or a Nightjar-Protocol header missing where required or naming a version "
         "the server does not serve (unsupported_protocol: the answer's 'supported' names the range)",
    401: "missing or wrong credentials, or an enrollment whose credential, attestation or nonce does not check out",
    403: "the session belongs to another device, the device was revoked or enrolled in another population",
    404: "unknown population, session, round, version or artifact (or nothing published yet)",
    405: "method not allowed", 408: "the request took too long to arrive",
    409: "wrong model version or task, the session already ended, or (secure aggregation) not this "
         "phase's message or a session no longer in the masking set",
    411: "a body without Content-Length", 413: "body larger than the limit",
    414: "request line too long", 415: "wrong Content-Type for this endpoint",
    422: "an update that cannot be aggregated, or secure-aggregation keys, shares or reveals that "
         "cannot be used (see the error code)",
    429: "too many requests from this device or address: retry after the Retry-After header's seconds",
    431: "request headers too large", 500: "a server bug",
}


class ProtocolError(Exception):
    """A request refused by the server: a code from `ErrorCode`, a message, the code's HTTP status.

    `status` may be given for an answer whose code this side does not know
    (a newer server); it defaults to the code's.
    """

    def __init__(self, code: ErrorCode | str, message: str, status: int | None = None):
        try:
            code = ErrorCode(code)
        except ValueError:
            pass
        self.code = code
        self.message = message
        self.status = status if status is not None else (
            code.status if isinstance(code, ErrorCode) else 400)
        super().__init__(f"HTTP {self.status} {self.code_name}: {message}")

    @property
    def code_name(self) -> str:
        return self.code.value if isinstance(self.code, ErrorCode) else str(self.code)

    def to_json(self) -> dict[str, str]:
        return {"error": self.code_name, "message": self.message}
