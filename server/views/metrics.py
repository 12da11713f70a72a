"""`GET /metrics`: Prometheus text format, behind the operator token like every operator view.

One port serves devices, apps and operators; Prometheus sends the token with
`authorization: {credentials_file: <state_dir>/operator_token}` in its scrape
config (server/README.md), so no second, unauthenticated port is opened.
"""
from __future__ import annotations

from flask import Blueprint, Response

from server import metrics
from server.views._common import require_operator, services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape():
    require_operator()
    return Response(metrics.exposition(services()), content_type=metrics.CONTENT_TYPE)
