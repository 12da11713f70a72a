"""The Flask application factory (as in the Flask tutorial): `create_app(config)`.

Services are built once per process here and kept in `app.extensions`; the
views in server/views only translate HTTP to service calls and back. Every
error a client can cause becomes `{"error": code, "message": ...}` with a 4xx:
the domain's ProtocolError, werkzeug's HTTP errors (404, 405, 413, ...) and,
as a last resort, anything unexpected (500, logged) — the tests throw random
input at every endpoint to keep that last handler unused.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from server.clock import Clock
from server.config import ServerConfig, load_config
from server.errors import ProtocolError
from server.publisher import Exporter
from server.services import Ticker, build_services

log = logging.getLogger(__name__)
UPLOAD_ENDPOINTS = {"sessions.upload"}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
               413: "payload_too_large", 415: "unsupported_media_type", 431: "headers_too_large"}


def create_app(config: str | Path | Mapping[str, Any] | ServerConfig | None = None, *,
               clock: Clock | None = None, exporter: Exporter | None = None) -> Flask:
    """A configured app: `config` is a file path, a mapping, a ServerConfig or None (defaults)."""
    from server.views import blueprints

    cfg = load_config(config)
    app = Flask("server")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload_bytes
    services = build_services(cfg, clock=clock, exporter=exporter)
    app.extensions["nightjar"] = services
    for bp in blueprints:
        app.register_blueprint(bp)

    @app.before_request
    def _limit_json_bodies():
        if request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = cfg.max_json_bytes

    @app.errorhandler(ProtocolError)
    def _protocol_error(e: ProtocolError):
        return jsonify(e.to_json()), e.http_status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = e.code or 500
        response = jsonify({"error": _HTTP_CODES.get(code, "http_error"),
                            "message": e.description or e.name})
        response.status_code = code
        for name, value in e.get_headers():
            if name == "Allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal_error", "message": "internal server error"}), 500

    if cfg.tick_interval_s > 0:
        app.extensions["nightjar_ticker"] = Ticker(services, cfg.tick_interval_s).start()
    return app
