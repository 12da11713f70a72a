"""A fleet with faults: phones unplugged mid-training, uploads lost once.

30% of the training tasks lose their charger part-way (the runtime stops
within a batch and reports `unplugged`), and 10% of uploads fail once at the
transport level — half before the server saw them, half after it accepted
them (the answer is lost, the retry must not be counted twice). Rounds must
still complete, the aborts must show in the round analytics, and each new
model must be exactly the server's FedAvg step over the updates it accepted:
parent + Σ nᵢ·Δᵢ / Σ nᵢ (server sgd, lr 1), with Δᵢ and nᵢ recorded on the
phones that uploaded them.
"""
from __future__ import annotations

import numpy as np
from safetensors.numpy import load as load_tensors
import pytest
import requests

from emulation.report import format_summary
from emulation.world import Faults
from models.corpus import load_corpus
from models.model import TINY
from contract.weights import load_checkpoint
from emulation.deployment import simulated_clock, start_server, tiny_model
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet

pytestmark = [pytest.mark.slow, pytest.mark.corpus]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **FLEET_POPULATION,
                          server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        run = run_fleet(root / "fleet", server, corpus, phones=20, rounds=4, keep_uploads=True,
                        faults=Faults(unplug_fraction=0.3, upload_failure_fraction=0.1, seed=1))
        print(format_summary(run.summary))
        base = f"{server.url}/v1/populations/en"
        details = [requests.get(f"{base}/rounds/{r['round']}", timeout=10).json()
                   for r in run.status.rounds]
        weights = {}
        for v in run.status.versions:
            blob = requests.get(f"{server.url}/v1/artifacts/{v['checkpoint_sha256']}", timeout=10).content
            path = root / f"v{v['version']}.safetensors"
            path.write_bytes(blob)
            weights[v["version"]] = load_checkpoint(path)[1]
        yield run, details, weights
    finally:
        server.kill()


def test_rounds_complete_despite_the_faults(faulty_run):
    run, details, _ = faulty_run
    s = run.summary
    assert s["runtime_errors"] == 0, run.fleet.errors
    assert s["train_rounds_completed"] >= 4
    injected = s["faults_injected"]
    trained = s["tasks_completed"] + s["tasks_discarded"] + sum(s["tasks_interrupted"].values())
    unplugged = s["tasks_interrupted"].get("unplugged", 0)
    others = sum(s["tasks_interrupted"].values()) - unplugged   # e.g. the window closed first
    assert 0 < unplugged <= injected["unplugged"] <= unplugged + others
    assert 0.2 <= injected["unplugged"] / trained <= 0.4, (injected, trained)
    assert injected["request_lost"] + injected["response_lost"] >= 1
    assert injected["request_lost"] + injected["response_lost"] <= 0.1 * s["uploads"] + 1


def test_aborts_appear_in_the_round_analytics(faulty_run):
    run, details, _ = faulty_run
    unplugged = sum(d["failure_reasons"].get("unplugged", 0) for d in details)
    assert unplugged == run.summary["tasks_interrupted"]["unplugged"]
    for d in details:
        outcomes = [dev["outcome"] for dev in d["devices"]]
        assert d["failed"] == outcomes.count("failed")
        assert d["reported"] == outcomes.count("accepted")
        assert d["selected"] == len(outcomes)


def test_each_new_model_is_the_average_of_exactly_the_accepted_updates(faulty_run):
    run, details, weights = faulty_run
    uploads = {}
    for up in run.fleet.uploads:
        if up.status == "accepted":
            assert up.session_id not in uploads
            uploads[up.session_id] = up
    checked = 0
    for d in details:
        if d["task"] != "train" or d["state"] != "completed":
            continue
        accepted = {dev["session_id"]: dev["num_examples"] for dev in d["devices"]
                    if dev["outcome"] == "accepted"}
        told = {sid for sid, u in uploads.items() if u.round == d["round"]}
        assert set(accepted) == told, "accepted on one side only"
        mine = [uploads[s] for s in accepted]
        assert all(u.num_examples == accepted[u.session_id] for u in mine)
        n = np.array([u.num_examples for u in mine], np.float64)
        mean = (n[:, None] * np.stack([load_tensors(u.body)['delta'] for u in mine])).sum(0) / n.sum()
        expected = weights[d["model_version"]] + mean
        np.testing.assert_allclose(weights[d["result_version"]], expected, atol=1e-6)
        checked += 1
    assert checked >= 4
