"""Structured logs: one JSON object per line, for requests and round transitions.

Every logger under `server` writes through `JsonFormatter` once
`configure(level)` has run (create_app does it, with the config's
`log_level`). A request line carries its request id (the client's
`X-Request-Id`, else a fresh one, echoed back in the response), the endpoint,
the status, the latency and, for an authenticated device, its pseudonym
(server.keys: a keyed hash, never the id). Round transitions go to
`server.rounds.transitions` with the population, round, task and new state.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys

REQUESTS = logging.getLogger("server.requests")
TRANSITIONS = logging.getLogger("server.rounds.transitions")
LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...fields}`; fields come from `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str) -> None:
    """Send every `server.*` logger to stderr as JSON lines at `level` (idempotent)."""
    root = logging.getLogger("server")
    root.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.propagate = False


def request(fields: dict) -> None:
    REQUESTS.info("%s %s %s", fields.get("method"), fields.get("endpoint"), fields.get("status"),
                  extra={"fields": fields})


def transition(fields: dict) -> None:
    TRANSITIONS.info("round %s/%s %s", fields.get("population"), fields.get("round"), fields.get("state"),
                     extra={"fields": fields})
