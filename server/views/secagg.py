"""Secure aggregation's phases on a session (server.secagg runs them; contract.secagg.messages types)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares
from server.errors import ErrorCode, ProtocolError
from server.views._common import device, json_body, services

bp = Blueprint("secagg", __name__, url_prefix="/v1/sessions")


def _session(session_id: str):
    caller = device("secagg")
    svc = services()
    session, rnd = svc.reporting.session(caller.id, session_id)
    if not rnd.secure:
        raise ProtocolError(ErrorCode.WRONG_TASK, "this session's round does not use secure aggregation")
    return svc, session, rnd


@bp.get("/<session_id>/secagg")
def status(session_id: str):
    svc, session, rnd = _session(session_id)
    svc.rounds.advance(rnd.population)            # a phase whose window passed moves on first
    session, rnd = svc.reporting.session(session["device_id"], session_id)
    return jsonify(svc.secagg.status(session, rnd).to_json())


def _answer(session_id: str, record, message_type):
    """One phase's answer: parsed with its contract type, recorded by the service, the round moved on."""
    svc, session, rnd = _session(session_id)
    record(svc.secagg)(session, rnd, message_type.from_json(json_body()))
    svc.rounds.advance(rnd.population)
    return jsonify({"status": "recorded"})


@bp.post("/<session_id>/secagg/keys")
def keys(session_id: str):
    return _answer(session_id, lambda sa: sa.advertise, SecAggKeys)


@bp.post("/<session_id>/secagg/shares")
def shares(session_id: str):
    return _answer(session_id, lambda sa: sa.submit_shares, SecAggShares)


@bp.post("/<session_id>/secagg/reveal")
def reveal(session_id: str):
    return _answer(session_id, lambda sa: sa.reveal, SecAggReveal)
