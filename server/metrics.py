"""Prometheus metrics: what the server counts, and the `/metrics` exposition.

Counters and histograms are incremented by the services through the helpers
below, each one registered with `Store.on_commit` inside the transaction that
records the event, so a counter says exactly what the database says (a
rolled-back transaction counts nothing).

Under gunicorn every worker is its own process: `python -m server run` sets
`PROMETHEUS_MULTIPROC_DIR` (one fresh directory per server start) before any
worker imports this module, and `/metrics` adds up every worker's files
(prometheus_client's multiprocess mode). In one process (tests, the CLI) the
same metrics live in this module's registry.

Gauges are read from the database when scraped (`StateCollector`): the open
round's reports and the ε spent are shared state, the same whichever worker
answers, so no per-process gauge has to be merged.

Phase durations are in the server's clock (simulated seconds under an
emulated fleet's scaled clock), as the round analytics report them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from server.populations import load_population

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_registry = CollectorRegistry(auto_describe=True)

CHECKINS = Counter("nightjar_checkins", "Device check-ins by outcome (selected, resumed, or why not).",
                   ["population", "outcome"], registry=_registry)
UPLOADS = Counter("nightjar_uploads", "Reports (updates, evaluations, ballots) by status: accepted, "
                  "duplicate, or the reason it was aborted (late, round_closed, goal_reached).",
                  ["population", "task", "status"], registry=_registry)
FAILURES = Counter("nightjar_session_failures", "Sessions that failed, by the reason the device "
                   "(or a revocation) gave.", ["population", "reason"], registry=_registry)
DROPPED = Counter("nightjar_sessions_dropped", "Sessions still open when their round closed.",
                  ["population"], registry=_registry)
RECEIVED = Counter("nightjar_received_bytes", "Report bytes counted into rounds.", ["population"],
                   registry=_registry)
SENT = Counter("nightjar_sent_bytes", "Model and plan bytes assigned to selected devices.", ["population"],
               registry=_registry)
TRANSITIONS = Counter("nightjar_round_transitions", "Rounds opened, completed and failed.",
                      ["population", "task", "state"], registry=_registry)
REQUEST_LATENCY = Histogram("nightjar_request_duration_seconds", "HTTP request latency by endpoint.",
                            ["endpoint", "method"], registry=_registry,
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PHASES = Histogram("nightjar_round_phase_duration_seconds", "Round phase durations (server clock): "
                   "selection, reporting, finalize.", ["population", "phase"], registry=_registry,
                   buckets=(.01, .1, 1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())


class StateCollector:
    """Gauges from shared state, computed at scrape time: the same answer from every worker."""

    def __init__(self, services):
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        svc = self._services
        reports = GaugeMetricFamily("nightjar_open_round_reports", "Reports counted in the open round.",
                                    labels=["population", "task"])
        number = GaugeMetricFamily("nightjar_round_number", "The newest round's number.", labels=["population"])
        published = GaugeMetricFamily("nightjar_published_version", "The version apps get.", labels=["population"])
        epsilon = GaugeMetricFamily("nightjar_dp_epsilon_spent", "ε spent by the published and unpublished "
                                    "versions so far (DP populations).", labels=["population"])
        budget = GaugeMetricFamily("nightjar_dp_epsilon_budget", "The population's ε budget.", labels=["population"])
        conn = svc.store.connection()
        for name in svc.populations():
            rnd = svc.rounds.latest(conn, name)
            if rnd is not None:
                number.add_metric([name], rnd.number)
                reports.add_metric([name, rnd.task], rnd.reported if rnd.is_open else 0)
            pub = load_population(conn, name).published_version
            if pub is not None:
                published.add_metric([name], pub)
            cfg = svc.config.population(name)
            if cfg.dp is not None:
                spent = (svc.privacy.summary(name, cfg) or {}).get("spent")
                if spent and spent.get("epsilon") is not None:
                    epsilon.add_metric([name], spent["epsilon"])
                if cfg.dp_budget is not None:
                    budget.add_metric([name], cfg.dp_budget.epsilon)
        yield from (reports, number, published, epsilon, budget)


def _counts() -> CollectorRegistry:
    """Every worker's counters and histograms (multiprocess mode), else this process's."""
    path = multiprocess_dir()
    if not path:
        return _registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def totals(name: str) -> list[tuple[dict, float]]:
    """A counter's value per label set, summed over workers: (labels, value) pairs."""
    return [(dict(sample.labels), sample.value) for family in _counts().collect() if family.name == name
            for sample in family.samples if sample.name == name + "_total"]


def exposition(services) -> bytes:
    """The text format of every counter (all workers' under gunicorn) and the state gauges."""
    body = generate_latest(_counts())
    state = CollectorRegistry()
    state.register(StateCollector(services))
    return body + generate_latest(state)


def observe_request(endpoint: str, method: str, seconds: float) -> None:
    REQUEST_LATENCY.labels(endpoint, method).observe(seconds)
