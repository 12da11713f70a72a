"""Artifacts by content hash: immutable, cacheable forever, revalidated by ETag."""
from __future__ import annotations

from flask import Blueprint, send_file

from server.errors import ErrorCode, ProtocolError
from server.views._common import services

bp = Blueprint("artifacts", __name__, url_prefix="/v1/artifacts")
ONE_YEAR_S = 365 * 24 * 3600


@bp.get("/<sha256>")
def get(sha256: str):
    store = services().artifacts
    if not store.exists(sha256):
        raise ProtocolError(ErrorCode.UNKNOWN_ARTIFACT, f"no artifact {sha256[:80]!r}")
    response = send_file(store.path(sha256), mimetype="application/octet-stream", etag=sha256,
                         conditional=True, max_age=ONE_YEAR_S)
    response.cache_control.immutable = True
    return response
