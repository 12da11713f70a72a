"""What the end-to-end tests share: a small population, a night to run it in, a fleet run.

The world itself (a model and its plan, the server config, the running
server) is `emulation.deployment`, which the benchmarks and the demo use too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from deploy.server_process import ServerProcess, operator_token
from emulation.deployment import enrollment, start_server
from emulation.fleet import Fleet, FleetConfig, FleetStatus, build_fleet, read_server_clock, shared_clock
from emulation.models import Model, tiny_corpus, tiny_model
from emulation.report import summarize
from emulation.world import FleetMix
from models.corpus import FederatedCorpus

NIGHT_UTC = 1_795_480_200.0   # 2026-11-24 00:30 UTC: most phones in UTC+0/+1 asleep on the charger

# A small population for fleets of ~20 phones: rounds of 5, a third over-selected.
FLEET_POPULATION = dict(goal=5, min_round_size=3, over_selection=1.4, min_selected_fraction=0.6,
                        min_report_fraction=0.6,
                        selection_window_s=600.0, reporting_window_s=1200.0, client_lr=0.5,
                        client_max_examples=32, eligibility={"min_separation_s": 1800.0})


@dataclasses.dataclass
class FleetRun:
    fleet: Fleet
    status: FleetStatus
    summary: dict      # emulation.report.summarize
    details: list[dict]   # every round's operator view (GET .../rounds/<n>), oldest first


def run_fleet(root: Path, server: ServerProcess, corpus: FederatedCorpus, phones: int = 20,
              rounds: int = 3, max_wall_s: float = 120.0, url: str | None = None,
              stop: threading.Event | None = None, **config) -> FleetRun:
    """Run `phones` phones (users = training clients) until `rounds` training rounds completed.

    The clock is the server's (read from its config); `url` lets the phones
    reach the server through something else (the privacy test's proxy); `stop`
    ends the run early when set (a test running the fleet in the background).
    `config` overrides FleetConfig fields (faults, mix, keep_uploads, ...).
    """
    start, speed, epoch = read_server_clock(server.config)
    config.setdefault("mix", FleetMix(zones_h=(0.0, 1.0)))
    clock = shared_clock(start, speed, epoch)
    token = operator_token(server.config)
    fleet_config = FleetConfig(url or server.url, root, "en", clock, workers=16,
                               enrollment=enrollment(server.config, "en", now=clock.now),
                               operator_token=token, **config)
    fleet = build_fleet(fleet_config, phones, corpus.train_texts)
    t0, sim0 = time.monotonic(), fleet_config.clock.now()
    try:
        status = fleet.run(lambda s: s.train_completed >= rounds or (stop is not None and stop.is_set()),
                           max_wall_s=max_wall_s,
                           progress=False)
    finally:
        fleet.close()
    details = [requests.get(f"{server.url}/v1/populations/en/rounds/{r['round']}", timeout=30,
                            headers={"Authorization": f"Bearer {token}"}).json()
               for r in sorted(status.rounds, key=lambda r: r["round"])]
    return FleetRun(fleet, status, summarize(fleet, status, time.monotonic() - t0, sim0), details)


@contextlib.contextmanager
def tiny_world(root: Path, **settings) -> Iterator[tuple[FederatedCorpus, Model, ServerProcess]]:
    """A tiny corpus, its model and plan, and a real server for them, stopped on exit."""
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **settings)
    try:
        yield corpus, model, server
    finally:
        server.kill()
