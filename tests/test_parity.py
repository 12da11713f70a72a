"""The production path computes FedAvg as the simulation does, update pipeline included.

One round through the real system — `python -m server run` (gunicorn,
SQLite), phones running the LiteRT plan over HTTP — and the same round in
simulation (models.fedavg: TFF's client work and server optimizer, the
contract's update pipeline between) on the same clients' data, visited in
the order each phone used (the seed the server gave it, `contract.model.batching`),
with the same learning rate, epochs, batch size, per-epoch example cap and
update spec: float32, and 8 bits with the Hadamard rotation, each rounded
with the phone's own session seed and rotated with the round's seed. The
weight is the examples processed (all epochs), capped at max_weight, as a
phone reports; the server's sgd at lr 1 is plain FedAvg.

Why 8 bits can match to 1e-5 at all: the phones' and TFF's deltas differ by
float rounding (~1e-7), which now and then puts a value on the other side of
a rounding threshold — one quantization step in the rotated space. The
inverse rotation spreads that step over a block of 1,024 weights (divided by
32), which keeps its trace in any one weight below 1e-5.

With dropout on, the plan the server hands out takes its dropout masks as
inputs: each phone draws them from its session seed (contract.model.dropout),
and the simulation draws the same ones for the same seed, so the round must
match within the same bound.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest

from device_runtime.conditions import EmulatedConditions
from device_runtime.runtime import Device, DeviceSettings
from models.corpus import load_corpus
from models.model import TINY
from contract.model.dropout import Dropout
from contract.model.text import to_sequences
from contract.update.spec import UpdateSpec
from emulation.deployment import enrollment, start_server
from emulation.models import initial_model
from tests.server_fixtures import served_version

pytestmark = [pytest.mark.slow, pytest.mark.corpus]
NIGHT = dt.datetime(2026, 11, 23, 23, 30)
ROUND = dict(client_lr=0.5, client_epochs=2, client_batch_size=16, client_max_examples=40)
SPECS = {"f32": UpdateSpec(bits=32), "q8-rotated": UpdateSpec(bits=8, rotation=True)}
DROPOUTS = {"no-dropout": None, "dropout": Dropout(0.3)}


@dataclasses.dataclass
class Report:
    windows: np.ndarray
    seed: int
    num_examples: int


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    models = {name: initial_model(tmp_path_factory.mktemp(name), corpus, TINY, dropout=dropout)
              for name, dropout in DROPOUTS.items()}
    # Three users with little, some and a lot of text (the cap binds for the last).
    sizes = {cid: len(w) for cid, w in corpus.train.items()}
    clients = [min(sizes, key=lambda c: abs(sizes[c] - n)) for n in (7, 25, 120)]
    return corpus, models, clients


def production_round(root, corpus, model, clients, **population) -> tuple[np.ndarray, list[Report]]:
    """One training round on the real server with one phone per client; the new global weights."""
    server = start_server(root / "server", model, goal=len(clients), **ROUND, **population)
    try:
        reports = []
        for i, cid in enumerate(clients):
            device = Device(root / f"phone{i}", server.url, EmulatedConditions(lambda: NIGHT),
                            settings=DeviceSettings("en"), seed=i, enrollment=enrollment(server.config, "en"))
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
        _, flat = served_version(server, 1)
        return flat, reports
    finally:
        server.kill()


def simulated_round(model, reports: list[Report], spec: UpdateSpec, dropout: Dropout | None) -> np.ndarray:
    """The same round in simulation: TFF client work (with the phones' dropout masks), the contract's
    pipeline, TFF's server sgd."""
    from models.fedavg import FederatedAveraging, client_optimizer
    from models.simulate import client_dataset, server_optimizer
    from models.tff_runtime import tff_session

    with tff_session():
        process = FederatedAveraging(model.config, client_optimizer(ROUND["client_lr"], None),
                                     server_optimizer("sgd", 1.0), spec, seed=0, dropout=dropout)  # the server's seed
        datasets = [client_dataset(r.windows, ROUND["client_batch_size"], ROUND["client_epochs"], r.seed,
                                   ROUND["client_max_examples"], dropout, model.config.embedding_dim)
                    for r in reports]
        result = process.next(model.flat, datasets, [r.seed for r in reports], round_num=1)
    assert result.clients == len(reports)
    assert int(result.train["num_examples"]) == sum(r.num_examples for r in reports)
    return result.weights


@pytest.mark.parametrize("drop", list(DROPOUTS))
@pytest.mark.parametrize("name", list(SPECS))
def test_one_round_through_server_and_phones_equals_the_simulation(world, tmp_path, name, drop):
    corpus, models, clients = world
    model, spec = models[drop], SPECS[name]
    update = {k: v for k, v in dataclasses.asdict(spec).items()}
    served, reports = production_round(tmp_path, corpus, model, clients, server_optimizer="sgd",
                                       server_lr=1.0, update=update)
    assert len({r.seed for r in reports}) == len(reports)          # each phone its own order
    for r, cid in zip(reports, clients):
        np.testing.assert_array_equal(r.windows, corpus.train[cid])  # the phone's text = the client's
    expected = simulated_round(model, reports, spec, DROPOUTS[drop])
    moved = np.abs(served - model.flat).max()
    diff = np.abs(served - expected).max()
    print(f"parity {name} {drop}: max |production - simulation| = {diff:.2e} (largest weight change {moved:.3f})")
    if DROPOUTS[drop] is not None:      # the masks matter: the same round without them lands elsewhere
        assert np.abs(simulated_round(model, reports, spec, None) - expected).max() > 10 * 1e-5
    assert moved > 1e-3
    assert diff <= 1e-5
