"""Fuzzing the live server from its own OpenAPI document with schemathesis, and what the run found.

`fuzz(server, ...)` points schemathesis (pinned in requirements-fuzz.txt and
installed by `make setup` in `.venv-fuzz`: TFF pins typing-extensions 4.5,
schemathesis needs a newer one) at a running server's `/openapi.json`: every
phase (examples, coverage, fuzzing, and stateful, which follows the
document's links register → check-in → upload), every operation,
authenticated through `emulation.fuzz_hooks`. The run fails on any 5xx, any
response that does not match the document, and a server that stops
answering. The summary counts the cases per operation from schemathesis'
NDJSON event stream.

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

from emulation.deployment import REPO, enrollment, operator_token
from server.config import RateLimits

FUZZ_PYTHON = REPO / ".venv-fuzz" / "bin" / "python"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
FUZZ_LIMITS = {f.name: [1e9, 3600.0] for f in dataclasses.fields(RateLimits)}


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


def fuzz(server, population: str, max_examples: int, work: Path, seed: int = 0,
         max_time_s: float | None = None) -> dict:
    """Run schemathesis against `server` (an emulation.server_process.ServerProcess); its summary."""
    from server.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    events = work / "events.ndjson"
    material = json.loads(load_config(server.config).enrollment_path(population).read_text())
    settings = {"url": server.url, "population": population, "operator_token": operator_token(server.config),
                "enrollment": material, "devices": enrolled_devices(server, population, 4), "seed": seed}
    command = [str(FUZZ_PYTHON), "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
               "--checks", CHECKS, "--max-examples", str(max_examples), "--seed", str(seed),
               "--phases", "examples,coverage,fuzzing,stateful", "--workers", "2",
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
    """Cases per operation, 5xx answers, schema violations and stateful transitions from NDJSON events."""
    per_operation: collections.Counter = collections.Counter()
    server_errors = schema_violations = transitions = 0
    failures: list[str] = []
    for line in events.read_text().splitlines() if events.is_file() else []:
        event = json.loads(line)
        for kind, body in event.items():
            if kind != "ScenarioFinished":
                continue
            recorder = body.get("recorder") or {}
            cases = recorder.get("cases") or {}
            interactions = recorder.get("interactions") or {}
            stateful = body.get("phase") == "stateful" or len(cases) > 1
            for case_id, entry in cases.items():
                value = entry.get("value") or {}
                label = f"{value.get('method', '?').upper()} {value.get('path', '?')}"
                per_operation[label] += 1
                status = ((interactions.get(case_id) or {}).get("response") or {}).get("status_code")
                if status is not None and status >= 500:
                    server_errors += 1
                if stateful and entry.get("transition"):
                    transitions += 1
            for check in (recorder.get("checks") or {}).values():
                for result in check:
                    if result.get("status") == "FAILURE":
                        if result.get("name") == "response_schema_conformance":
                            schema_violations += 1
                        failures.append(f"{result.get('name')}: {str(result.get('failure_info'))[:200]}")
    return {"cases": sum(per_operation.values()), "per_operation": dict(sorted(per_operation.items())),
            "server_errors": server_errors, "schema_violations": schema_violations,
            "stateful_transitions": transitions, "failures": failures[:50]}
