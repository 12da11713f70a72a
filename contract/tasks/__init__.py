"""The task kinds a round can run, and what each kind's phone and server halves share.

`KINDS` is the one registry of task kinds: the server's `server/tasks/` and the
phone's `device_runtime/tasks/` each hold one module per kind, keyed by these
names, and an assignment's report URL is `/v1/sessions/<session>/<report>`.

* `personal`  — personalization: the personal model, how it is judged, the counts that leave a phone;
* `discovery` — federated discovery of new words (TrieHH).

The package imports nothing beyond the standard library at load time.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Kind:
    """One task kind as the wire knows it."""

    name: str            # Assignment.task
    report: str          # the report endpoint: POST /v1/sessions/<session>/<report>
    maskable: bool       # its report may travel masked under secure aggregation
    uses_plan: bool      # the phone needs the training plan and the round's checkpoint


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("train", "update", maskable=True, uses_plan=True),
    Kind("eval", "eval", maskable=False, uses_plan=True),
    Kind("personalize", "personal", maskable=True, uses_plan=True),
    Kind("discover", "discovery", maskable=False, uses_plan=False),
)}
NAMES: tuple[str, ...] = tuple(KINDS)


def report_path(kind: str, session_id: str) -> str:
    """Where a session of `kind` reports its result."""
    return f"/v1/sessions/{session_id}/{KINDS[kind].report}"


def failure_path(session_id: str) -> str:
    """Where a session of any kind reports that it stopped (a reason code only)."""
    return f"/v1/sessions/{session_id}/failure"
