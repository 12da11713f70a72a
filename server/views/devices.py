"""Device registration and check-in."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from contract.wire import CHECKIN_REQUEST, Assignment, Conditions
from server.views._common import JSON_TYPE, device, json_body, require_content_type, services

bp = Blueprint("devices", __name__, url_prefix="/v1")


@bp.post("/devices")
def register():
    if request.content_length:
        require_content_type(JSON_TYPE)
    registration = services().registry.register()
    return jsonify({"device_id": registration.device_id, "secret": registration.secret}), 201


@bp.post("/checkin")
def checkin():
    caller = device()
    body = CHECKIN_REQUEST.parse(json_body())
    svc = services()
    result = svc.checkin.checkin(caller, body["population"], Conditions(**body["conditions"]))
    if isinstance(result, Assignment):
        return jsonify({"assignment": result.to_json()})
    return jsonify({"rejection": result.to_json()})
