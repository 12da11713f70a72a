"""gunicorn's threaded worker, with the errors gunicorn answers itself written as JSON.

gunicorn refuses some requests before Flask sees them — a request line over
`limit_request_line` (414), headers over their limits (431), a malformed
request line (400) — and answers them with an HTML page. A client of this
server expects `{"error": code, "message": ...}` from every error, so this
worker writes those answers in the same JSON shape, with the protocol's codes.
"""
from __future__ import annotations

import json

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from contract.protocol.errors import ErrorCode

_CODES = {400: ErrorCode.BAD_REQUEST, 403: ErrorCode.FORBIDDEN, 414: ErrorCode.URI_TOO_LONG,
          431: ErrorCode.HEADERS_TOO_LARGE}


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    code = _CODES.get(status_int, ErrorCode.INTERNAL_ERROR if status_int >= 500 else ErrorCode.BAD_REQUEST)
    body = json.dumps({"error": code.value, "message": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class JsonErrorThreadWorker(ThreadWorker):
    """`worker_class = "server.worker.JsonErrorThreadWorker"` (what `python -m server run` uses).

    gunicorn writes its error pages through `gunicorn.util.write_error`; the
    worker points that at `write_json_error` once, in its own process, before
    it serves anything.
    """

    def init_process(self):
        util.write_error = write_json_error
        super().init_process()
