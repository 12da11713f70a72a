"""What every view needs: the services, the JSON body, the caller's identity, its rate limits."""
from __future__ import annotations

import hmac
from typing import Any

from flask import current_app, g, request

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


def client_address() -> str:
    """The caller's address: the peer's, or the last X-Forwarded-For hop behind a trusted proxy."""
    if services().config.trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            return forwarded.split(",")[-1].strip()[:64]
    return request.remote_addr or "unknown"


def limit(action: str, device_id: str | None = None) -> None:
    """Take a token from the action's per-address bucket (and per-device one): 429 when empty."""
    svc = services()
    limits = svc.config.rate_limits
    svc.limits.take(f"{action}:addr:{client_address()}", getattr(limits, f"{action}_per_address"),
                    f"{action} requests from this address")
    if device_id is not None:
        svc.limits.take(f"{action}:dev:{device_id}", getattr(limits, f"{action}_per_device"),
                        f"{action} requests from this device")


def device(action: str | None = None) -> Device:
    """The authenticated caller (401/403 otherwise), with `action`'s rate limits applied."""
    found = services().registry.authenticate(request.headers.get("Authorization"))
    g.device = services().registry.pseudonym(found.id)      # for the request's log line (server.logs)
    if action is not None:
        limit(action, found.id)
    return found


def is_operator() -> bool:
    scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
    token = services().operator_token
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def require_operator() -> None:
    """Operator endpoints need `Bearer <operator_token>` (server init writes it; see server.keys)."""
    if not is_operator():
        raise ProtocolError(ErrorCode.UNAUTHORIZED,
                            "operator endpoints need 'Authorization: Bearer <operator_token>'")
