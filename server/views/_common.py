"""What every view needs: the services, the JSON body, the caller's identity."""
from __future__ import annotations

import hmac
from typing import Any

from flask import current_app, request

from server import validation as v
from server.errors import Unauthorized
from server.registry import Device
from server.services import Services


def services() -> Services:
    return current_app.extensions["nightjar"]


def json_body() -> dict[str, Any]:
    """The request body as a JSON object (any Content-Type), or BadRequest."""
    return dict(v.as_object(v.parse_json(request.get_data(cache=False))))


def device() -> Device:
    return services().registry.authenticate(request.headers.get("Authorization"))


def require_operator() -> None:
    """Operator endpoints need `Bearer <operator_token>` when the config sets one."""
    token = services().config.operator_token
    if not token:
        return
    scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("operator endpoints need 'Authorization: Bearer <operator_token>'")
