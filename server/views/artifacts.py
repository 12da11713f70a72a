"""Artifacts by content hash: immutable, cacheable forever, revalidated by ETag; served only to whom
server.artifact_access allows (anyone for a published app model, else a device assigned to a round
that uses it, or the operator)."""
from __future__ import annotations

from flask import Blueprint, request, send_file

from server.errors import ErrorCode, ProtocolError
from server.views._common import is_operator, limit, services

bp = Blueprint("artifacts", __name__, url_prefix="/v1/artifacts")
ONE_YEAR_S = 365 * 24 * 3600


@bp.get("/<sha256>")
def get(sha256: str):
    svc = services()
    operator = is_operator()
    caller = None
    if not operator and request.headers.get("Authorization"):
        caller = svc.registry.authenticate(request.headers.get("Authorization"))
    if not operator:
        limit("artifact", caller.id if caller else None)
    store = svc.artifacts
    if not store.exists(sha256) or not svc.access.allowed(sha256, caller, operator):
        raise ProtocolError(ErrorCode.UNKNOWN_ARTIFACT, f"no artifact {sha256[:80]!r}")
    response = send_file(store.path(sha256), mimetype="application/octet-stream", etag=sha256,
                         conditional=True, max_age=ONE_YEAR_S)
    response.cache_control.immutable = True
    if svc.access.is_public(sha256):
        response.cache_control.public = True
    else:
        response.cache_control.private = True
    return response
