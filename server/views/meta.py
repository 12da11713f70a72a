"""The OpenAPI document and a health check."""
from __future__ import annotations

from flask import Blueprint, jsonify

from server.openapi import openapi_document
from server.views._common import services

bp = Blueprint("meta", __name__)


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_document(services().config))


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})
