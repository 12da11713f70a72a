"""Starting and, above all, stopping TensorFlow Federated's C++ worker.

TFF runs computations in a `worker_binary` subprocess that it starts on first
use and does not reliably stop: the process outlives Python and keeps the
parent's stdout/stderr open, which hangs whatever waits on those pipes (a CI
job, `make`, a test runner). Everything in Nightjar that runs TFF does so
inside `tff_session()`, and `stop_workers()` is also registered at exit.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import psutil

WORKER_NAME = "worker_binary"


def worker_processes(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """TFF workers among the (recursive) children of `parent` (default: this process)."""
    parent = parent or psutil.Process()
    found = []
    for child in parent.children(recursive=True):
        try:
            if child.name() == WORKER_NAME or any(WORKER_NAME in a for a in child.cmdline()[:1]):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_workers(timeout_s: float = 5.0) -> int:
    """Terminate every TFF worker this process started; returns how many were running."""
    workers = [w for w in worker_processes() if is_alive(w)]
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.send_signal(signal.SIGINT)   # what TFF itself sends; the worker exits cleanly
    deadline = time.monotonic() + timeout_s
    for w in workers:
        while is_alive(w) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_alive(w):
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
    return len(workers)


def is_alive(p: psutil.Process) -> bool:
    # A stopped worker stays a zombie until TFF (or init) reaps it; that is not running.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def tff_session() -> Iterator[object]:
    """Yields the `tensorflow_federated` module; stops its workers on the way out."""
    import tensorflow_federated as tff

    # One computation call per core: TFF's default (unbounded) runs every
    # client of a round at once, and on 2 cores that is ~10% slower.
    tff.backends.native.set_sync_local_cpp_execution_context(
        max_concurrent_computation_calls=os.cpu_count() or 1)
    try:
        yield tff
    finally:
        stop_workers()


def _sigterm_to_exit(signum, frame):  # pragma: no cover - exercised via subprocess tests
    raise SystemExit(128 + signum)


def install_exit_handlers() -> None:
    """Make SIGTERM unwind like Ctrl-C so `finally` blocks and atexit stop the worker."""
    signal.signal(signal.SIGTERM, _sigterm_to_exit)


atexit.register(stop_workers)
