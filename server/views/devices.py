"""Device registration and check-in."""
from __future__ import annotations

from flask import Blueprint, jsonify

from server import validation as v
from server.checkin import Assignment
from server.policy import DeviceConditions
from server.views._common import device, json_body, services

bp = Blueprint("devices", __name__, url_prefix="/v1")


@bp.post("/devices")
def register():
    registration = services().registry.register()
    return jsonify({"device_id": registration.device_id, "secret": registration.secret}), 201


@bp.post("/checkin")
def checkin():
    caller = device()
    body = json_body()
    population = v.string(body, "population", max_len=64)
    conditions = DeviceConditions.from_json(v.required(body, "conditions"))
    svc = services()
    result = svc.checkin.checkin(caller, population, conditions)
    if isinstance(result, Assignment):
        return jsonify({"assignment": result.to_json(svc.clock.now())})
    return jsonify({"rejection": result.to_json()})
