"""What services report as they change state: Prometheus counts and round-transition logs.

Each function is called inside the write transaction that records the event
and registers its effect with `Store.on_commit`, so metrics and logs say
exactly what the database committed, once, whichever worker committed it.
"""
from __future__ import annotations

from server import logs
from server import metrics as m


def checkin(store, population: str, outcome: str) -> None:
    store.on_commit(lambda: m.CHECKINS.labels(population, outcome).inc())


def selected(store, population: str, bytes_out: int) -> None:
    def emit():
        m.CHECKINS.labels(population, "selected").inc()
        m.SENT.labels(population).inc(bytes_out)
    store.on_commit(emit)


def upload(store, population: str, task: str, status: str, bytes_in: int = 0) -> None:
    def emit():
        m.UPLOADS.labels(population, task, status).inc()
        if bytes_in:
            m.RECEIVED.labels(population).inc(bytes_in)
    store.on_commit(emit)


def failure(store, population: str, reason: str) -> None:
    store.on_commit(lambda: m.FAILURES.labels(population, reason or "unknown").inc())


def round_opened(store, population: str, number: int, task: str, model_version: int, attempt: int) -> None:
    def emit():
        m.TRANSITIONS.labels(population, task, "opened").inc()
        logs.transition({"event": "round_transition", "population": population, "round": number, "task": task,
                         "state": "selecting", "model_version": model_version, "attempt": attempt})
    store.on_commit(emit)


def selection_closed(store, population: str, number: int, task: str, selected: int) -> None:
    store.on_commit(lambda: logs.transition({"event": "round_transition", "population": population,
                                             "round": number, "task": task, "state": "reporting",
                                             "selected": selected}))


def round_closed(store, row, state: str, reason: str | None, dropped: int, phases: dict) -> None:
    """A round completed or failed; `row` is its rounds row after the close."""
    population, task = row["population"], row["task"]

    def emit():
        m.TRANSITIONS.labels(population, task, state).inc()
        if dropped:
            m.DROPPED.labels(population).inc(dropped)
        for phase, seconds in phases.items():
            if seconds is not None:
                m.PHASES.labels(population, phase.removesuffix("_s")).observe(max(0.0, seconds))
        logs.transition({"event": "round_transition", "population": population, "round": row["number"],
                         "task": task, "state": state, "reason": reason, "selected": row["selected"],
                         "reported": row["reported"], "aborted": row["aborted"], "failed": row["failed"],
                         "dropped": dropped, "result_version": row["result_version"], "phases": phases})
    store.on_commit(emit)
