"""A phone against the real server with personalization on: it personalizes the published version in its
training window, suggests from its personal model, and what it sends (recorded on the wire) never carries
that model — a personalize task uploads only its counts, which are exactly the simulation loop's."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from contract.tasks.personal import PersonalReport, PersonalSpec
from device_runtime.training import local_windows
from models.personalize import evaluate_users
from tests.device_world import wait_for_app_model, night_device, record_checkins, server_weights, texts_of
from tests.e2e import tiny_world
from tests.recording_proxy import RecordingProxy
from tflite_export.reader import load_plan

pytestmark = pytest.mark.slow
SPEC = {"epochs": 2, "lr": 0.3, "cache_weight": 0.3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("personal"), eval_every=1, publish_every=1,
                    personalization=SPEC, personal_eval_every=1) as world:
        yield world


def test_the_personal_model_stays_on_the_phone_and_the_evaluation_sends_only_counts(world, tmp_path):
    corpus, model, server = world
    texts = texts_of(corpus, [0, 1, 2])
    with RecordingProxy(server.url) as proxy:
        device = night_device(tmp_path / "d", SimpleNamespace(url=proxy.url, config=server.config), texts)
        seen = record_checkins(device)
        device.step()                                   # train -> version 1
        device.step()                                   # eval of version 1 -> published
        app = wait_for_app_model(server.url)
        assert app["version"] == 1 and app["personalization"]["spec"]["epochs"] == 2
        assert device.refresh_app_model() == 1
        device.step()                                   # personalizes version 1, then the personalize task
        assert [a.task for a in seen] == ["train", "eval", "personalize"], seen
        meta = device.personalizer.meta()
        assert meta["base_version"] == 1 and not device.personalizer.due(1)
        assert device.predictor.personal_active != meta["fell_back"]
        device.step()                                   # nothing new to personalize: no work, no download
        assert device.personalizer.meta() == meta
        events = [e for e in device.opstats.events() if e["kind"] == "personalize"]
        assert len(events) == 1 and events[0]["outcome"] in ("kept", "fell_back")
        device.close()

    # Nothing sent carries the personal model: no body holds any 64-byte run of its weights, and the
    # only report of the personalize task is its counts.
    stored = [device.personalizer.dir / name for name in ("weights.safetensors", "bias_delta.npy")]
    secret = b"".join(path.read_bytes() for path in stored if path.exists())
    assert not meta["fell_back"] and len(secret) > 1000        # this phone kept a personal model
    posts = [r for r in proxy.requests if r.method == "POST"]
    for r in proxy.requests:
        for i in range(0, max(len(secret) - 64, 0), 4096):
            assert secret[i:i + 64] not in r.body
    paths = {r.target.split("?")[0].rsplit("/", 1)[-1] for r in posts}
    assert paths <= {"nonces", "devices", "checkin", "update", "eval", "personal"}, paths
    (sent,) = [json.loads(r.body) for r in posts if r.target.endswith("/personal")]
    assert set(sent) == {"model_version", "counts"} and len(sent["counts"]) == PersonalReport.size()

    # The simulation's loop on the same client, split and seed gives the same counts.
    plan = load_plan(model.plan_dir / "plan.manifest.json")
    v1 = server_weights(server, seen[2].checkpoint["sha256"], tmp_path)
    windows = local_windows(plan, texts)
    (row,) = evaluate_users(plan, v1, {"me": windows}, PersonalSpec.from_json(SPEC),
                            seed=int(seen[2].hyperparameters["seed"]), progress=False)
    counts = np.asarray(sent["counts"])
    assert (counts[0], counts[2], counts[4], bool(counts[-1])) == (
        row.global_top1, row.personal_top1, row.positions, row.fell_back)
    detail = requests.get(f"{server.url}/v1/populations/en/rounds/{seen[2].round}", timeout=10,
                          headers=server.operator_headers).json()
    assert detail["personalization"]["devices"] == 1
    assert detail["personalization"]["personal"]["top1"] == row.personal_top1 / row.positions


def test_under_secure_aggregation_phones_send_masked_counts_and_the_server_unmasks_only_their_sum(tmp_path):
    """Emulated phones (the real runtime, LiteRT, the real server) in a secure population: the
    personalize round runs SecAgg+, every /personal body is masked, and the server's unmasked sum is
    exactly the sum of the plaintexts the phones masked (recorded on the test's side)."""
    from emulation.deployment import simulated_clock, start_server
    from emulation.models import tiny_corpus, tiny_model
    from tests.e2e import NIGHT_UTC, run_fleet
    from tests.test_secagg_fleet import SECURE, masked_key, recorded_plaintexts

    corpus = tiny_corpus()
    model = tiny_model(tmp_path / "model", corpus)
    server = start_server(tmp_path / "server", model, **dict(SECURE, goal=5), personalization=SPEC,
                          personal_eval_every=1, server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        with recorded_plaintexts() as masked_from, RecordingProxy(server.url) as proxy:
            run = run_fleet(tmp_path / "fleet", server, corpus, phones=24, rounds=2, url=proxy.url,
                            max_wall_s=300)
    finally:
        server.kill()
    (d,) = [d for d in run.details if d["task"] == "personalize" and d["state"] == "completed"][:1]
    assert d["secagg"]["phase"] == "done" and d["secagg"]["survivors"] == d["reported"] >= 3, d["secagg"]
    sessions = {dev["session_id"] for dev in d["devices"] if dev["outcome"] == "accepted"}
    sent = {r.target.split("/")[3]: json.loads(r.body) for r in proxy.requests
            if r.method == "POST" and r.target.endswith("/personal")}
    assert sessions <= set(sent)
    total = np.zeros(PersonalReport.size(), np.int64)
    for sid in sessions:
        body = sent[sid]
        assert body["masked"] is True and set(body) == {"model_version", "counts", "masked"}
        words = np.asarray(body["counts"], np.int64).astype(np.uint32)
        plain = masked_from[masked_key(words)].astype(np.int64)       # what the phone gave its masker
        assert not np.array_equal(words, plain)
        total += plain
    p = d["personalization"]
    assert (p["devices"], p["positions"]) == (len(sessions), int(total[4]))
    assert abs(p["global"]["top1"] - total[0] / total[4]) < 1e-12
    assert abs(p["personal"]["top1"] - total[2] / total[4]) < 1e-12
