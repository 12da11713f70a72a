"""The production path computes FedAvg as TensorFlow Federated defines it.

One round through the real system — `python -m server run` (gunicorn,
SQLite), phones running the LiteRT plan over HTTP — and the same round with
TFF's `build_weighted_fed_avg` on the same clients' data, visited in the
order each phone used (the seed the server gave it, `contract.batching`), with
the same learning rate, epochs, batch size and per-epoch example cap. TFF
weights each client by the examples it processed (all epochs), which is what
a phone reports as `num_examples`; the server's sgd at lr 1 is plain FedAvg.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import requests

from device_runtime.conditions import EmulatedConditions
from device_runtime.runtime import Device, DeviceSettings
from models.corpus import load_corpus
from models.model import TINY
from contract.text import to_sequences
from contract.weights import load_checkpoint
from emulation.deployment import initial_model, start_server

pytestmark = [pytest.mark.slow, pytest.mark.corpus]
NIGHT = dt.datetime(2026, 11, 23, 23, 30)
ROUND = dict(client_lr=0.5, client_epochs=2, client_batch_size=16, client_max_examples=40)


@dataclasses.dataclass
class Report:
    windows: np.ndarray
    seed: int
    num_examples: int


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    model = initial_model(tmp_path_factory.mktemp("model"), corpus, TINY)
    # Three users with little, some and a lot of text (the cap binds for the last).
    sizes = {cid: len(w) for cid, w in corpus.train.items()}
    clients = [min(sizes, key=lambda c: abs(sizes[c] - n)) for n in (7, 25, 120)]
    return corpus, model, clients


def production_round(root, corpus, model, clients, **population) -> tuple[np.ndarray, list[Report]]:
    """One training round on the real server with one phone per client; the new global weights."""
    server = start_server(root / "server", model, goal=len(clients), **ROUND, **population)
    try:
        reports = []
        for i, cid in enumerate(clients):
            device = Device(root / f"phone{i}", server.url, EmulatedConditions(lambda: NIGHT),
                            settings=DeviceSettings("en"), seed=i)
            for text in corpus.train_texts[cid]:
                device.examples.add(text)
            seen = []
            checkin = device.client.checkin
            device.client.checkin = lambda *a, **k: seen.append(checkin(*a, **k)) or seen[-1]
            device.step()
            events = [e for e in device.opstats.events() if e["kind"] == "task"]
            assert events and events[0]["outcome"] == "completed", device.opstats.events()
            windows = to_sequences(device.examples.texts(), corpus.vocab, corpus.seq_len)
            reports.append(Report(windows, int(seen[0].hyperparameters["seed"]), events[0]["examples"]))
            device.close()
        version = _wait_for_version(server.url, 1)
        blob = requests.get(f"{server.url}/v1/artifacts/{version['checkpoint_sha256']}", timeout=10).content
        (root / "v1.safetensors").write_bytes(blob)
        _, flat, _ = load_checkpoint(root / "v1.safetensors")
        return flat, reports
    finally:
        server.kill()


def _wait_for_version(url: str, number: int, timeout_s: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = requests.get(f"{url}/v1/populations/en/versions", timeout=10).json()["versions"]
        found = [v for v in versions if v["version"] == number]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no version {number} after {timeout_s} s")


def tff_round(model, reports: list[Report], server_optimizer: str, server_lr: float) -> np.ndarray:
    """The same round in TFF: `build_weighted_fed_avg`, one `next` over the same client data."""
    from models.simulate import (SimulationConfig, build_process, client_dataset, global_weights,
                                 set_global_weights)
    from models.tff_runtime import tff_session

    sim = SimulationConfig(client_lr=ROUND["client_lr"], local_epochs=ROUND["client_epochs"],
                           batch_size=ROUND["client_batch_size"],
                           max_client_examples=ROUND["client_max_examples"],
                           server_optimizer=server_optimizer, server_lr=server_lr)
    with tff_session():
        process = build_process(model.config, sim)
        state = set_global_weights(process, process.initialize(), model.config, model.flat)
        datasets = [client_dataset(r.windows, sim.batch_size, sim.local_epochs, r.seed,
                                   sim.max_client_examples) for r in reports]
        result = process.next(state, datasets)
        weights = global_weights(process, result.state, model.config)
        processed = int(result.metrics["client_work"]["train"]["num_examples"])
    assert processed == sum(r.num_examples for r in reports)
    return weights


@pytest.mark.parametrize("optimizer,lr,tolerance", [("sgd", 1.0, 1e-4), ("adam", 0.01, 1e-4)])
def test_one_round_through_server_and_phones_equals_tff_fedavg(world, tmp_path, optimizer, lr, tolerance):
    corpus, model, clients = world
    served, reports = production_round(tmp_path, corpus, model, clients, server_optimizer=optimizer,
                                       server_lr=lr)
    assert len({r.seed for r in reports}) == len(reports)          # each phone its own order
    for r, cid in zip(reports, clients):
        np.testing.assert_array_equal(r.windows, corpus.train[cid])  # the phone's text = the client's
    expected = tff_round(model, reports, optimizer, lr)
    moved = np.abs(served - model.flat).max()
    diff = np.abs(served - expected).max()
    print(f"parity {optimizer}: max |production - TFF| = {diff:.2e} (largest weight change {moved:.3f})")
    assert moved > 1e-3
    assert diff <= tolerance
