"""Federated discovery over HTTP with real phones: a word typed by fewer than min_devices phones is
never revealed, one typed by enough is found and joins the vocabulary of a new version, the phones
train on the new vocabulary afterwards, and no vote names anything the server did not ask about."""
from __future__ import annotations

import dataclasses
import json

import pytest
import requests

from contract.model.text import Vocabulary
from emulation.deployment import simulated_clock, start_server
from emulation.models import tiny_corpus, tiny_model
from emulation.world import FleetMix
from tests.e2e import NIGHT_UTC, run_fleet
from tests.recording_proxy import RecordingProxy

pytestmark = pytest.mark.slow
MIN_DEVICES = 4
RARE, COMMON = "zorblax", "quintus"          # typed by MIN_DEVICES - 1 and by 2 x MIN_DEVICES phones
# Every phone on the charger, idle and on Wi-Fi from 02:00 UTC: each round can hear from all of them.
ALWAYS = FleetMix(zones_h=(0.0,), early_fraction=0.0, daytime_fraction=0.0, no_wifi_fraction=0.0,
                  low_memory_fraction=0.0)


@pytest.fixture(scope="module")
def discovery_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("discovery-fleet")
    corpus = tiny_corpus(free_slots=8)
    clients = sorted(corpus.train_texts)
    texts = dict(corpus.train_texts)
    for i, c in enumerate(clients[:2 * MIN_DEVICES]):
        texts[c] = texts[c] + [f"The {COMMON} doth speak to the hall."]
        if i < MIN_DEVICES - 1:
            texts[c] = texts[c] + [f"The {RARE} is gone."]
    corpus = dataclasses.replace(corpus, train_texts=texts)
    model = tiny_model(root / "model", corpus)
    n = len(clients)
    server = start_server(root / "server", model, goal=n, min_round_size=3, over_selection=1.0,
                          min_selected_fraction=0.9, min_report_fraction=0.9, selection_window_s=900.0,
                          reporting_window_s=900.0, client_lr=0.5, client_max_examples=32, eval_every=0,
                          eligibility={"min_separation_s": 0.0},
                          discovery={"every": 1, "min_devices": MIN_DEVICES, "votes_per_device": 50},
                          server=simulated_clock(NIGHT_UTC + 5400, 240.0))
    try:
        with RecordingProxy(server.url) as proxy:
            run = run_fleet(root / "fleet", server, corpus, phones=n, rounds=3, url=proxy.url,
                            max_wall_s=240, mix=ALWAYS)
        yield server, run, proxy.requests, model
    finally:
        server.kill()


def operator(server, path: str):
    return requests.get(f"{server.url}/v1/populations/en{path}", timeout=30,
                        headers=server.operator_headers).json()


def test_a_word_of_min_devices_is_found_and_one_of_fewer_never(discovery_run):
    server, run, _, _ = discovery_run
    found = operator(server, "/discovery")["words"]
    assert COMMON in found and RARE not in found, found
    discover = [d for d in run.details if d["task"] == "discover" and d["state"] == "completed"]
    assert len(discover) <= 2 * (len(COMMON) + 1)          # within two passes of levels


def test_the_new_word_joins_the_vocabulary_of_a_new_version_and_the_phones_train_on_it(discovery_run):
    server, run, _, model = discovery_run
    grown = [d for d in run.details if d["task"] == "discover" and d.get("result_version")]
    assert grown, "no discovery round made a version"
    version = grown[0]["result_version"]
    later = [d for d in run.details if d["task"] == "train" and d["state"] == "completed"
             and d["round"] > grown[0]["round"]]
    assert later and all(d["reported"] >= 3 for d in later)      # phones trained on the new plan
    assert run.summary["runtime_errors"] == 0
    versions = {v["version"]: v for v in operator(server, "/versions?limit=100")["versions"]}
    assert versions[version]["train"]["source"] == "discovery"
    old = Vocabulary.load(model.vocab)
    assert COMMON not in old.tokens


def test_no_vote_names_anything_the_server_did_not_ask_about(discovery_run):
    _, _, recorded, _ = discovery_run
    ballots = [json.loads(r.body) for r in recorded if r.method == "POST" and r.target.endswith("/discovery")]
    assert ballots
    allowed = {COMMON[:i] for i in range(1, len(COMMON) + 1)} | {COMMON + "$", RARE[0]}
    for b in ballots:
        assert set(b["votes"]) <= allowed, b              # never "zo...": "z" was never found
    for r in recorded:
        assert RARE.encode() not in r.body


def test_the_plan_is_reissued_with_the_grown_vocabulary(discovery_run):
    import sqlite3

    from server.artifacts import ArtifactStore
    from server.config import load_config

    server, _, _, model = discovery_run
    cfg = load_config(server.config)
    plan = json.loads(sqlite3.connect(cfg.database).execute(
        "SELECT plan_json FROM populations WHERE name = 'en'").fetchone()[0])
    artifacts = ArtifactStore(cfg.artifact_dir)
    manifest = json.loads(artifacts.read(plan["manifest_sha256"]))
    old = json.loads((model.plan_dir / "plan.manifest.json").read_text())
    assert manifest["files"]["plan.tflite"] == old["files"]["plan.tflite"]       # the same graph ...
    assert manifest["vocab_sha256"] != old["vocab_sha256"]                        # ... a new vocabulary
    grown = Vocabulary.from_json(artifacts.read(plan["vocab_sha256"]).decode())
    assert grown.sha256 == manifest["vocab_sha256"] and COMMON in grown.tokens
    assert len(grown) == len(Vocabulary.load(model.vocab))                      # a free slot, no new shape
