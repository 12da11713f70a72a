"""A short schemathesis run (about 1,000 cases) against the real server: `make fuzz` runs ten times more.

Every phase over every operation, from the server's own /openapi.json, with
the fuzz hooks' credentials. No answer may be a 5xx or differ from the
document, the server must keep answering, and the stateful phase must follow
the document's links.
"""
from __future__ import annotations

import pytest

from emulation import fuzz
from deploy.server_process import ServerProcess, free_port
from tests.server_fixtures import init_small_population, write_small_config

pytestmark = pytest.mark.slow


def fuzz_config(tmp_path):
    population = {k: v for k, v in fuzz.FUZZ_POPULATION.items() if k != "server"}
    config = write_small_config(tmp_path, **population)
    limits = fuzz.FUZZ_POPULATION["server"]["rate_limits"]
    with open(config, "a") as f:
        f.write("\n[rate_limits]\n" + "".join(f"{k} = [{burst}, {per_s}]\n" for k, (burst, per_s) in limits.items()))
    return config


@pytest.mark.skipif(fuzz.available() is not None, reason=str(fuzz.available()))
def test_a_short_fuzz_run_finds_no_server_error_and_no_schema_violation(tmp_path):
    config = fuzz_config(tmp_path)
    init_small_population(tmp_path, config)
    with ServerProcess(config, free_port(), tmp_path / "server.log", workers=2, threads=4) as server:
        summary = fuzz.fuzz(server, "en", 35, tmp_path / "fuzz")
    print({k: v for k, v in summary.items() if k not in ("per_operation", "log_tail")})
    assert fuzz.passed(summary, min_cases=900, chains=False) == []
    operations = {label.split(" ", 1)[1] for label in summary["per_operation"]}
    assert {"/v1/devices", "/v1/checkin", "/v1/sessions/{session_id}/update",
            "/v1/populations/{population}/rounds/{number}"} <= operations
    assert summary["stateful_transitions"] > 0


def test_the_summary_counts_what_the_event_stream_says(tmp_path):
    """summarize() on a hand-written stream in schemathesis' NDJSON shape: a chain, a 5xx, a violation."""
    import json

    def case(cid, method, path, parent=None):
        entry = {"value": {"method": method, "path": path}, "is_transition_applied": parent is not None}
        return cid, {**entry, **({"parent_id": parent} if parent else {})}

    cases = dict([case("a", "POST", "/v1/devices"), case("b", "POST", "/v1/checkin", "a"),
                  case("c", "POST", "/v1/sessions/{session_id}/update", "b"), case("d", "GET", "/healthz")])
    statuses = {"a": 201, "b": 200, "c": 422, "d": 503}
    recorder = {"cases": cases,
                "interactions": {k: {"response": {"status_code": v}} for k, v in statuses.items()},
                "checks": {"d": [{"name": "response_schema_conformance", "status": "failure",
                                  "failure_info": "x"}, {"name": "not_a_server_error", "status": "failure"}],
                           "a": [{"name": "not_a_server_error", "status": "success"}]}}
    events = tmp_path / "events.ndjson"
    events.write_text(json.dumps({"PhaseStarted": {}}) + "\n"
                      + json.dumps({"ScenarioFinished": {"phase": "stateful", "recorder": recorder}}) + "\n")
    got = fuzz.summarize(events)
    assert (got["cases"], got["server_errors"], got["schema_violations"]) == (4, 1, 1)
    assert (got["stateful_transitions"], got["full_chains"]) == (2, 1)
    assert got["per_operation"]["POST /v1/checkin"] == 1 and len(got["failures"]) == 2
