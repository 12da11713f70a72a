"""Shared fixtures, and the guard that no TFF worker outlives the test session."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a TFF `worker_binary` started by it is still running.

    Code under test must stop its workers itself (models.tff_runtime); this
    only detects a leak, reports it, and then cleans up so CI never hangs.
    """
    from models.tff_runtime import is_alive, stop_workers, worker_processes

    leaked = [p for p in worker_processes() if is_alive(p)]
    if leaked:
        stop_workers()
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: {len(leaked)} TFF worker_binary process(es) left running by the "
              f"tests: {[p.pid for p in leaked]} (stopped now)")
