"""What every view needs: the services, the JSON body, the caller's identity."""
from __future__ import annotations

import hmac
from typing import Any

from flask import current_app, request

from server import validation as v
from server.errors import ErrorCode, ProtocolError
from server.registry import Device
from server.services import Services

JSON_TYPE = "application/json"


def services() -> Services:
    return current_app.extensions["nightjar"]


def json_body() -> Any:
    """The request body as JSON (Content-Type application/json); check it with a wire schema."""
    require_content_type(JSON_TYPE)
    return v.parse_json(request.get_data(cache=False))


def require_content_type(expected: str) -> None:
    given = (request.mimetype or "").lower()
    if given != expected:
        raise ProtocolError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                            f"this endpoint takes Content-Type {expected}, not {given or 'none'}")


def device() -> Device:
    return services().registry.authenticate(request.headers.get("Authorization"))


def require_operator() -> None:
    """Operator endpoints need `Bearer <operator_token>` when the config sets one."""
    token = services().config.operator_token
    if not token:
        return
    scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ProtocolError(ErrorCode.UNAUTHORIZED,
                            "operator endpoints need 'Authorization: Bearer <operator_token>'")
