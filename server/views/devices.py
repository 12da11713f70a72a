"""Enrollment (a nonce, then registration with an attested statement) and check-in."""
from __future__ import annotations

from flask import Blueprint, jsonify

from contract.protocol.attestation import Attestation
from contract.protocol.wire import CHECKIN_REQUEST, NONCE_REQUEST, REGISTRATION_REQUEST, Assignment, Conditions
from server.errors import ErrorCode, ProtocolError
from server.views._common import device, json_body, limit, services

bp = Blueprint("devices", __name__, url_prefix="/v1")


@bp.post("/enrollment/nonces")
def nonce():
    limit("nonce")
    body = NONCE_REQUEST.parse(json_body())
    return jsonify(services().enrollment.issue_nonce(body["population"]).to_json()), 201


@bp.post("/devices")
def register():
    limit("register")
    body = REGISTRATION_REQUEST.parse(json_body())
    registration = services().enrollment.enroll(body["population"], body["app_credential"],
                                                Attestation(**body["attestation"]))
    return jsonify(registration.to_json()), 201


@bp.post("/checkin")
def checkin():
    caller = device("checkin")
    body = CHECKIN_REQUEST.parse(json_body())
    if caller.population is not None and body["population"] != caller.population:
        raise ProtocolError(ErrorCode.WRONG_POPULATION, f"this device enrolled in {caller.population!r}")
    svc = services()
    result = svc.checkin.checkin(caller, body["population"], Conditions(**body["conditions"]))
    if isinstance(result, Assignment):
        return jsonify({"assignment": result.to_json()})
    return jsonify({"rejection": result.to_json()})
