"""The one domain error type of the server, and the few kinds of it.

Service modules raise these and never import Flask; `server.app` turns any of
them into `{"error": code, "message": ...}` with the error's HTTP status. A
request that raises one has changed no stored state: every service validates
before it opens its write transaction, or raises inside it (rolling it back).
"""
from __future__ import annotations


class ProtocolError(Exception):
    """A request the server refuses: a machine-readable code, a message, an HTTP status."""

    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class BadRequest(ProtocolError):
    """Malformed JSON, a missing field, a value of the wrong type or out of range."""


class Unauthorized(ProtocolError):
    code, http_status = "unauthorized", 401


class Forbidden(ProtocolError):
    code, http_status = "forbidden", 403


class NotFound(ProtocolError):
    code, http_status = "not_found", 404


class Conflict(ProtocolError):
    """The request is well formed but does not fit the state (wrong model version, closed session)."""

    code, http_status = "conflict", 409


class InvalidUpdate(ProtocolError):
    """An uploaded update that cannot be aggregated (format, dtype, shape, non-finite values)."""

    code, http_status = "invalid_update", 422
