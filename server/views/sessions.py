"""Reports on a session: the update upload, an evaluation result, a failure."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from server import validation as v
from server.reporting import FAILURE_REASONS, EvalReport
from server.views._common import device, json_body, services

bp = Blueprint("sessions", __name__, url_prefix="/v1/sessions")


@bp.post("/<session_id>/update")
def upload(session_id: str):
    """Body: safetensors bytes ("delta", float32 [N]); metadata in the query string."""
    caller = device()
    model_version = v.query_int(request.args, "model_version", 0, v.MAX_INT)
    num_examples = v.query_int(request.args, "num_examples", 0, v.MAX_INT)
    raw_metrics = request.args.get("metrics")
    metrics = v.metrics(v.parse_json(raw_metrics.encode(), "metrics")) if raw_metrics else {}
    body = request.get_data(cache=False)
    outcome = services().reporting.upload(caller.id, session_id, body, model_version, num_examples, metrics)
    return jsonify(outcome.to_json())


@bp.post("/<session_id>/eval")
def evaluation(session_id: str):
    caller = device()
    body = json_body()
    report = EvalReport(top1_hits=v.integer(body, "top1_hits", lo=0),
                        top3_hits=v.integer(body, "top3_hits", lo=0),
                        positions=v.integer(body, "positions", lo=0),
                        loss_sum=v.number(body, "loss_sum", default=None, lo=0.0, hi=v.MAX_METRIC))
    model_version = v.integer(body, "model_version", lo=0)
    return jsonify(services().reporting.evaluation(caller.id, session_id, model_version, report).to_json())


@bp.post("/<session_id>/failure")
def failure(session_id: str):
    caller = device()
    body = json_body()
    reason = v.string(body, "reason", choices=FAILURE_REASONS)
    detail = v.string(body, "detail", default=None, max_len=500)
    return jsonify(services().reporting.failure(caller.id, session_id, reason, detail).to_json())
