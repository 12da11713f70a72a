"""A short schemathesis run (about 1,500 cases) against the real server: `make fuzz` runs ten times more.

The same checks as `make fuzz` (every one: `--checks all`) in every phase over
every operation, from the server's own /openapi.json, with the fuzz hooks'
credentials. No check may fail (no 5xx, no answer the document does not
describe, no valid request refused nor invalid one accepted, ...), the server
must keep answering, and the stateful phase must follow the document's links.
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
    assert fuzz.CHECKS == "all" and {"not_a_server_error", "status_code_conformance", "response_schema_conformance",
                                     "positive_data_acceptance", "negative_data_rejection", "missing_required_header",
                                     "ignored_auth", "unsupported_method"} <= set(summary["checks"])
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
    phases = [{"PhaseFinished": {"phase": {"name": name}, "status": status}}
              for name, status in (("probing", "success"), ("examples", "skip"), ("stateful", "success"))]
    events.write_text("".join(json.dumps(e) + "\n" for e in [{"PhaseStarted": {}}, *phases, {
        "ScenarioFinished": {"phase": "stateful", "recorder": recorder}}]))
    got = fuzz.summarize(events)
    assert (got["cases"], got["server_errors"], got["schema_violations"], got["failed_checks"]) == (4, 1, 1, 2)
    assert (got["stateful_transitions"], got["full_chains"]) == (2, 1)
    assert got["per_operation"]["POST /v1/checkin"] == 1 and len(got["failures"]) == 2
    assert got["checks"] == ["not_a_server_error", "response_schema_conformance"]
    assert got["phases"] == {"examples": "skip", "stateful": "success"}
    problems = fuzz.passed({**got, "server_alive": True, "exit_code": 1, "log_tail": ""}, min_cases=1)
    assert [p.split(":")[0] for p in problems[:3]] == ["phase examples", "phase coverage", "phase fuzzing"]


def test_the_fuzz_server_is_stopped_whole_and_started_once(tmp_path):
    """make fuzz's server (benchmarks.fuzz.fuzz_server): one gunicorn master and its workers while
    it runs, nothing of its process group afterwards, even when the run inside fails."""
    import os

    from benchmarks.fuzz import fuzz_server

    def group(pgid: int) -> list[int]:
        """Live processes in process group `pgid` (zombies excluded)."""
        out = []
        for entry in os.listdir("/proc"):
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if entry.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
        return out

    def servers_of(root) -> list[int]:
        """Live processes whose command line names this test's server config (a second start would show)."""
        needle = str(root / "server" / "server.toml").encode()
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if needle in open(f"/proc/{entry}/cmdline", "rb").read():
                    found.append(int(entry))
            except OSError:
                pass
        return found

    with pytest.raises(RuntimeError, match="the run failed"):
        with fuzz_server(tmp_path) as server:
            pgid = server.proc.pid
            running = group(pgid)
            assert len(running) >= 3 and set(servers_of(tmp_path)) == set(running)   # master + 2 workers, once
            raise RuntimeError("the run failed")
    assert group(pgid) == [] and servers_of(tmp_path) == []
