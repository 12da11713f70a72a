"""Reports on a session: the update upload, an evaluation result, personalization counts, discovery votes,
a failure."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from contract.tasks.personal import PersonalEvalReport
from contract.protocol.wire import METRICS, DiscoveryBallot, EvalReport, FailureReport
from server import validation as v
from server.tasks.train import Upload
from server.views._common import device, json_body, require_content_type, services

bp = Blueprint("sessions", __name__, url_prefix="/v1/sessions")
UPDATE_TYPE = "application/octet-stream"
MAX_WEIGHT = 2**31


@bp.post("/<session_id>/update")
def upload(session_id: str):
    """Body: the encoded update (contract.update.pipeline); metadata in the query string."""
    caller = device("upload")
    require_content_type(UPDATE_TYPE)
    model_version = v.query_int(request.args, "model_version", 0, v.MAX_INT)
    num_examples = v.query_int(request.args, "num_examples", 1, MAX_WEIGHT, default=None)   # the service
    # says whether the round needs it (under secure aggregation the weight is inside the masked body)
    metrics = v.query_json(request.args, "metrics", METRICS, default={})
    body = request.get_data(cache=False)
    upload = Upload(body, model_version, num_examples, metrics)
    return jsonify(services().reporting.report(caller.id, session_id, "train", upload).to_json())


@bp.post("/<session_id>/eval")
def evaluation(session_id: str):
    caller = device()
    report = EvalReport.from_json(json_body())
    return jsonify(services().reporting.report(caller.id, session_id, "eval", report).to_json())


@bp.post("/<session_id>/personal")
def personal(session_id: str):
    """A personalization evaluation's counts (contract.tasks.personal.PersonalEvalReport)."""
    caller = device()
    report = PersonalEvalReport.from_json(json_body())
    return jsonify(services().reporting.report(caller.id, session_id, "personalize", report).to_json())


@bp.post("/<session_id>/discovery")
def discovery(session_id: str):
    caller = device()
    ballot = DiscoveryBallot.from_json(json_body())
    return jsonify(services().reporting.report(caller.id, session_id, "discover", ballot).to_json())


@bp.post("/<session_id>/failure")
def failure(session_id: str):
    caller = device()
    report = FailureReport.from_json(json_body())
    return jsonify(services().reporting.failure(caller.id, session_id, report.reason).to_json())
