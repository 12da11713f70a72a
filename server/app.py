"""The Flask application factory (as in the Flask tutorial): `create_app(config)`.

Services are built once per process here and kept in `app.extensions`; the
views in server/views only translate HTTP to service calls and back. Every
error a client can cause becomes `{"error": code, "message": ...}` with a 4xx:
the protocol's `ProtocolError`, werkzeug's HTTP errors (404, 405, 413, ...)
and, as a last resort, anything unexpected (500, logged) — the tests throw
random input at every endpoint to keep that last handler unused. Errors that
gunicorn answers itself, before Flask sees the request (a request line or
headers over its limits), are JSON too: server.worker, whose event loop reads
every request whole before a thread sees it and refuses a body over its
route's limit (`body_limit`, the same limits as the hooks here) with 413 and
`Connection: close` before reading it. OPTIONS is not served: 405 JSON with
`Allow`, like any method a route does not take (the protocol has no use for
CORS: phones are not browsers, and the dashboard is same-origin).

JSON responses never hold NaN or Infinity (they are not JSON): a non-finite
number becomes null.

The first thing read of a device request is its protocol version
(contract.protocol.version): the device API (enrollment, check-in, a
session's reports and its secure-aggregation phases) must name a version the
server serves in the `Nightjar-Protocol` header; the public reads apps and
CDNs make (an artifact, the app-model description) may leave it out — their
bytes are pinned by hash and described by the manifest's own schema version —
but must not name an unsupported one. Either way the refusal is 400
unsupported_protocol with the supported range, before the body, the
credential or the rate limits are looked at. Operator and meta endpoints do
not read it.
"""
from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from server import logs, metrics
from contract.clock import Clock
from contract.protocol import version as protocol
from server.config import ServerConfig, load_config
from server.errors import ErrorCode, ProtocolError
from server.publisher import Exporter
from server.ratelimit import RateLimited
from server.services import Ticker, build_services

log = logging.getLogger(__name__)
UPLOAD_ENDPOINTS = {"sessions.upload"}
HTTP_CODES = {400: ErrorCode.BAD_REQUEST, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN,
              404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 408: ErrorCode.REQUEST_TIMEOUT,
              411: ErrorCode.LENGTH_REQUIRED, 413: ErrorCode.PAYLOAD_TOO_LARGE, 414: ErrorCode.URI_TOO_LONG,
              415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 431: ErrorCode.HEADERS_TOO_LARGE}

# The device API (every endpoint of these blueprints) must name its protocol version; these public reads
# may leave it out (module docstring).
DEVICE_BLUEPRINTS = frozenset({"devices", "sessions", "secagg"})
PUBLIC_READS = frozenset({"artifacts.get", "populations.latest_app_model", "populations.app_model"})


class UnsupportedProtocol(ProtocolError):
    """400 unsupported_protocol; the answer names the versions served (`supported`: {min, max})."""

    def __init__(self, given: str | None):
        lo, hi = protocol.SUPPORTED
        number = protocol.parse(given)
        said = ("did not say which version it speaks" if given is None else
                f"named version {number}" if number is not None else "named no version number")
        super().__init__(ErrorCode.UNSUPPORTED_PROTOCOL,
                         f"this server speaks {protocol.HEADER} {lo} to {hi}; the request {said}")

    def to_json(self) -> dict:
        lo, hi = protocol.SUPPORTED
        return {**super().to_json(), "supported": {"min": lo, "max": hi}}


def protocol_rule(endpoint: str | None) -> str | None:
    """Whether `endpoint` must name the protocol version ("required"), may ("optional") or ignores it (None)."""
    if endpoint is None:
        return None
    if endpoint.split(".", 1)[0] in DEVICE_BLUEPRINTS:
        return "required"
    return "optional" if endpoint in PUBLIC_READS else None


def _check_protocol() -> None:
    rule = protocol_rule(request.endpoint)
    given = request.headers.get(protocol.HEADER)
    if rule is None or (given is None and rule == "optional"):
        return
    if not protocol.supported(given):
        raise UnsupportedProtocol(given)


def _refuse_nul() -> None:
    """No text the protocol carries contains U+0000: refuse it at the door (PostgreSQL could not
    even compare it with a stored value, and no stored value holds one)."""
    texts = [request.path, request.query_string.decode("latin-1"), request.headers.get("Authorization", ""),
             request.headers.get("Cookie", "")]
    body = request.get_data() if request.endpoint not in UPLOAD_ENDPOINTS and request.is_json else b""
    if any("\x00" in t or "%00" in t for t in texts) or b"\\u0000" in body or b"\x00" in body:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "text must not contain NUL (U+0000)")


def _request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a short token, else a fresh one (never echo arbitrary text)."""
    if given and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given):
        return given
    return secrets.token_hex(8)


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class StrictJSONProvider(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("default", self.default)
        return json.dumps(finite(obj), allow_nan=False, **kwargs)


def create_app(config: str | Path | Mapping[str, Any] | ServerConfig | None = None, *,
               clock: Clock | None = None, exporter: Exporter | None = None) -> Flask:
    """A configured app: `config` is a file path, a mapping, a ServerConfig or None (defaults)."""
    from server.views import blueprints

    cfg = load_config(config)
    logs.configure(cfg.log_level)
    app = Flask("server")
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False     # OPTIONS: 405 JSON with Allow (module docstring)
    app.json = StrictJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload_bytes
    services = build_services(cfg, clock=clock, exporter=exporter)
    app.extensions["nightjar"] = services
    for bp in blueprints:
        app.register_blueprint(bp)

    app.extensions["nightjar_body_limit"] = lambda method, target: body_limit(app, cfg, method, target)
    _install_request_hooks(app, cfg)
    _install_error_handlers(app)
    if cfg.tick_interval_s > 0:
        app.extensions["nightjar_ticker"] = Ticker(services, cfg.tick_interval_s).start()
    return app


def body_limit(app: Flask, cfg: ServerConfig, method: str, target: str) -> int:
    """The most body bytes `method target` may carry: an upload's limit, or a JSON body's.

    server.worker asks this before reading a body, so it refuses an oversized one without
    buffering it. A request no route takes gets the larger limit: Flask answers it (404, 405)
    without reading the body, as it always has.
    """
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path or "/", errors="replace")
    try:
        endpoint, _ = app.url_map.bind("localhost").match(path, method)
    except Exception:          # no route (NotFound, MethodNotAllowed, a redirect) or a path it cannot read
        return cfg.max_upload_bytes
    return cfg.max_upload_bytes if endpoint in UPLOAD_ENDPOINTS else cfg.max_json_bytes


def _install_request_hooks(app: Flask, cfg: ServerConfig) -> None:
    """Per request: the protocol version, body limits and NUL at the door; afterwards its latency,
    request id and log line."""

    @app.before_request
    def _limit_json_bodies():
        g.started = time.perf_counter()
        g.request_id = _request_id(request.headers.get("X-Request-Id"))
        _check_protocol()
        if request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = cfg.max_json_bytes
        _refuse_nul()

    @app.after_request
    def _observe(response):
        """Latency per endpoint (Prometheus) and one JSON log line per request (server.logs)."""
        started = g.get("started")
        if started is None:
            return response
        seconds = time.perf_counter() - started
        endpoint = request.endpoint or "unmatched"     # a fixed set of names, never the raw path
        metrics.observe_request(endpoint, request.method, seconds)
        response.headers["X-Request-Id"] = g.request_id
        logs.request({"event": "request", "request_id": g.request_id, "method": request.method,
                      "endpoint": endpoint, "status": response.status_code, "latency_ms": round(seconds * 1e3, 3),
                      "device": g.get("device"), "bytes_in": request.content_length or 0})
        return response


def _install_error_handlers(app: Flask) -> None:
    """Every error a client can cause as `{"error": code, "message": ...}` with its 4xx status."""

    @app.errorhandler(ProtocolError)
    def _protocol_error(e: ProtocolError):
        response = jsonify(e.to_json())
        response.status_code = e.status
        if isinstance(e, RateLimited):
            response.headers["Retry-After"] = str(int(e.retry_after_s))
        return response

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = e.code or 500
        error = HTTP_CODES.get(code)
        message = e.description or e.name
        if code == 405:
            message = f"{request.method} is not served at this path; it takes {', '.join(e.valid_methods or ())}"
        response = jsonify({"error": error.value if error else "http_error", "message": message})
        response.status_code = code
        for name, value in e.get_headers():
            if name == "Allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": ErrorCode.INTERNAL_ERROR.value, "message": "internal server error"}), 500
