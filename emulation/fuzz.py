"""Fuzzing the live server from its own OpenAPI document with schemathesis, and what the run found.

`fuzz(server, ...)` points schemathesis (pinned in requirements-fuzz.txt and
installed by `make setup` in `.venv-fuzz`: TFF pins typing-extensions 4.5,
schemathesis needs a newer one) at a running server's `/openapi.json`: every
check (`--checks all`), every phase (examples, coverage, fuzzing, and
stateful, which follows the document's links register → check-in → upload),
every operation, authenticated through `emulation.fuzz_hooks`. The run fails
on any failed check (a 5xx, an answer the document does not describe, valid
data refused, invalid data accepted, authentication not enforced, ...), a
phase that did not run, and a server that stops answering. The summary
counts the cases per operation, the checks and the phases from
schemathesis' NDJSON event stream.

The server it fuzzes should raise its per-device and per-address rate limits
(`FUZZ_LIMITS`): the fuzzer is one address and a handful of devices, and the
limits have tests of their own.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import requests

from deploy.server_process import operator_token
from emulation.deployment import REPO, enrollment
from server.config import RateLimits

FUZZ_PYTHON = REPO / ".venv-fuzz" / "bin" / "python"
STATEFUL_STEPS = 12      # steps per stateful scenario (schemathesis' default, 6, rarely reaches an upload)
CHECKS = "all"
# What schemathesis' checks expect, where the document says more than their defaults (no 5xx anywhere:
# not_a_server_error fails on any):
# * invalid data may also be refused 413: an over-long array or string can take a body past the JSON cap;
# * a schema-valid update body may be 422: its bytes are a safetensors file, which no JSON Schema can
#   describe (the upload's description lists the 422 codes).
# The stateful phase follows the document's links with valid requests only, as a phone would (register →
# check-in → upload): the other three phases send the invalid ones, and an invalid step (a missing
# Nightjar-Protocol header, say) ends a chain at its first request.
SCHEMATHESIS_TOML = f"""
[phases.stateful]
max-steps = {STATEFUL_STEPS}
generation.mode = "positive"

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429"]

[[operations]]
include-operation-id = "upload"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
"""
FUZZ_LIMITS = {f.name: [1e9, 3600.0] for f in dataclasses.fields(RateLimits)}
# A population that keeps a round open for the whole run with room for every check-in the fuzzer
# makes eligible, so the stateful phase, which comes last, can still reach an upload
# (emulation.deployment.start_server keys). `make fuzz`'s earlier phases make thousands of eligible
# check-ins: a goal of 2,000 filled the round before the stateful phase began.
FUZZ_POPULATION = {"goal": 1_000_000, "over_selection": 1.0, "min_selected_fraction": 1.0,
                   "selection_window_s": 4 * 3600.0, "reporting_window_s": 4 * 3600.0,
                   "server": {"rate_limits": FUZZ_LIMITS}}


def available() -> str | None:
    """Why fuzzing cannot run here (None if it can)."""
    if not FUZZ_PYTHON.is_file():
        return f"no schemathesis environment at {FUZZ_PYTHON.parent.parent} (make setup creates it)"
    return None


def enrolled_devices(server, population: str, count: int) -> list[str]:
    """`count` devices enrolled as phones do; their Authorization values."""
    from device_runtime.client import ServerClient
    from device_runtime.transport import Transport

    client = ServerClient(Transport(server.url))
    out = []
    for _ in range(count):
        device_id, secret = client.register(population, enrollment(server.config, population))
        out.append(f"Bearer {device_id}:{secret}")
    return out


PHASES = ("examples", "coverage", "fuzzing", "stateful")


def passed(summary: dict, min_cases: int, chains: bool = True) -> list[str]:
    """What a run's summary fails on (empty: it passed)."""
    problems = [f"phase {name}: {summary['phases'].get(name, 'not run')}" for name in PHASES
                if summary["phases"].get(name) != "success"]
    if summary["cases"] < min_cases:
        problems.append(f"{summary['cases']} cases, fewer than {min_cases}")
    if summary["server_errors"]:
        problems.append(f"{summary['server_errors']} answers were 5xx")
    if summary["schema_violations"]:
        problems.append(f"{summary['schema_violations']} answers did not match the document")
    if summary["failed_checks"]:
        problems.append(f"{summary['failed_checks']} failed checks, first: {summary['failures'][0]}")
    if not summary["server_alive"]:
        problems.append("the server stopped answering")
    if summary["exit_code"] != 0:
        problems.append(f"schemathesis exited {summary['exit_code']}: {summary['log_tail'][-600:]}")
    if chains and not summary["full_chains"]:
        problems.append("no stateful chain register → check-in → upload")
    return problems


def fuzz(server, population: str, max_examples: int, work: Path, seed: int = 0,
         max_time_s: float | None = None) -> dict:
    """Run schemathesis against `server` (a deploy.server_process.ServerProcess); its summary.

    `max_examples` is per operation and phase (schemathesis' --max-examples).
    """
    from server.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    events = work / "events.ndjson"
    material = json.loads(load_config(server.config).enrollment_path(population).read_text())
    settings = {"url": server.url, "population": population, "operator_token": operator_token(server.config),
                "enrollment": material, "devices": enrolled_devices(server, population, 4), "seed": seed}
    (work / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    command = [str(FUZZ_PYTHON), "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"),
               "run", f"{server.url}/openapi.json",
               "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", str(seed),
               "--phases", ",".join(PHASES), "--workers", "1", "--continue-on-failure",
               "--report", "ndjson", "--report-ndjson-path", str(events), "--request-timeout", "30",
               "--suppress-health-check", "all", "--no-color", "--generation-database", "none"]
    if max_time_s:
        command += ["--max-time", str(int(max_time_s))]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "emulation.fuzz_hooks", "PYTHONPATH": str(REPO),
           "NIGHTJAR_FUZZ": json.dumps(settings)}
    t0 = time.monotonic()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    (work / "schemathesis.log").write_text(done.stdout + done.stderr)
    summary = summarize(events)
    try:
        alive = requests.get(server.url + "/healthz", timeout=10).status_code == 200
    except requests.RequestException:
        alive = False
    return {**summary, "wall_s": round(wall, 1), "server_alive": alive, "exit_code": done.returncode,
            "log_tail": (done.stdout + done.stderr)[-3000:]}


def summarize(events: Path) -> dict:
    """What schemathesis' NDJSON event stream says: cases per operation, 5xx answers, schema
    violations, every check's name and its failures, how each phase ended, stateful transitions
    followed, and full register → check-in → upload chains."""
    per_operation: collections.Counter = collections.Counter()
    server_errors = schema_violations = transitions = chains = failed = 0
    failures: list[str] = []
    checks: set[str] = set()
    phases: dict[str, str] = {}
    for line in events.read_text().splitlines() if events.is_file() else []:
        event = json.loads(line)
        if "PhaseFinished" in event:
            phases[event["PhaseFinished"]["phase"]["name"]] = event["PhaseFinished"]["status"]
        body = event.get("ScenarioFinished")
        if not body:
            continue
        recorder = body.get("recorder") or {}
        cases = recorder.get("cases") or {}
        interactions = recorder.get("interactions") or {}

        def label(case_id: str) -> str:
            value = (cases.get(case_id) or {}).get("value") or {}
            return f"{value.get('method', '?').upper()} {value.get('path', '?')}"

        def status(case_id: str) -> int | None:
            return ((interactions.get(case_id) or {}).get("response") or {}).get("status_code")

        for case_id, entry in cases.items():
            per_operation[label(case_id)] += 1
            if (status(case_id) or 0) >= 500:
                server_errors += 1
            if entry.get("is_transition_applied"):
                transitions += 1
                checkin = entry.get("parent_id")
                register = (cases.get(checkin) or {}).get("parent_id")
                if (label(case_id) == "POST /v1/sessions/{session_id}/update" and status(checkin) == 200
                        and label(register) == "POST /v1/devices" and status(register) == 201):
                    chains += 1
        for case_id, results in (recorder.get("checks") or {}).items():
            for result in results:
                checks.add(result.get("name"))
                if result.get("status") == "failure":
                    failed += 1
                    if result.get("name") == "response_schema_conformance":
                        schema_violations += 1
                    failures.append(f"{label(case_id)}: {result.get('name')}: "
                                    f"{str(result.get('failure_info'))[:300]}")
    return {"cases": sum(per_operation.values()), "per_operation": dict(sorted(per_operation.items())),
            "server_errors": server_errors, "schema_violations": schema_violations, "failed_checks": failed,
            "checks": sorted(checks), "phases": {k: v for k, v in phases.items() if k in PHASES},
            "stateful_transitions": transitions, "full_chains": chains, "failures": failures[:50]}
