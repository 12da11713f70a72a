"""Against the real server with evaluation and publishing every round: the device's evaluation
counts are the plan's own, and the published app model (real exporter subprocess) reaches it."""
from __future__ import annotations


import pytest
import requests

from device_runtime.runtime import Device
from device_runtime.training import local_windows
from contract.model.metrics import count_hits
from tests.device_world import (wait_for_app_model, night_device, record_checkins, round_detail, server_weights,
                                task_events, texts_of)
from tests.e2e import tiny_world
from tflite_export.reader import load_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("eval_publish"), eval_every=1, publish_every=1) as world:
        yield world


def test_evaluation_task_then_the_published_app_model(world, tmp_path):
    corpus, model, server = world
    texts = texts_of(corpus, [0, 1])
    device = night_device(tmp_path / "d", server, texts)
    seen = record_checkins(device)
    device.step()
    device.step()
    assert [(a.task, a.model_version) for a in seen] == [("train", 0), ("eval", 1)], seen
    event = task_events(device)[0]
    assert (event["outcome"], event["task"]) == ("completed", "eval"), event
    assert event["eval_s"] >= 0 and "train_s" not in event

    # The counts are contract.model.metrics' own, for the plan with version 1's weights on the device's text.
    plan = load_plan(model.plan_dir / "plan.manifest.json")
    plan.set_weights(server_weights(server, seen[1].checkpoint["sha256"], tmp_path))
    windows = local_windows(plan, texts)
    hits = count_hits(plan.infer(windows[:, :-1]), windows[:, 1:])
    assert hits.positions > 100 and hits.top3 > 0
    mine = round_detail(server, seen[1].round)["devices"][0]
    assert mine["outcome"] == "accepted"
    assert {k: mine["metrics"][k] for k in ("top1_hits", "top3_hits", "positions")} == \
        {"top1_hits": hits.top1, "top3_hits": hits.top3, "positions": hits.positions}
    assert mine["metrics"]["loss_sum"] > 0
    versions = requests.get(f"{server.url}/v1/populations/en/versions", timeout=10,
                            headers=server.operator_headers).json()["versions"]
    v1_eval = next(v for v in versions if v["version"] == 1)["eval"]
    assert (v1_eval["top1_hits"], v1_eval["top3_hits"]) == (hits.top1, hits.top3)

    published = wait_for_app_model(server.url)
    assert published["version"] == 1
    assert device.refresh_app_model() == 1
    suggestions = device.predictor.suggest("the king")
    assert len(suggestions) == 3, suggestions
    words, probs = zip(*suggestions)
    assert all(w in corpus.vocab.tokens and w not in ("<pad>", "<bos>", "<oov>") for w in words)
    assert all(0 < p <= 1 for p in probs) and list(probs) == sorted(probs, reverse=True)
    assert [e["outcome"] for e in device.opstats.events() if e["kind"] == "app_model"] == ["installed"]
    assert device.refresh_app_model() == 1                    # already current: nothing downloaded
    device.close()

    restarted = Device(tmp_path / "d", server.url, device.conditions, settings=device.settings,
                       enrollment=device.enrollment)
    assert restarted.predictor.version == 1                   # from disk, verified, no download
    assert restarted.predictor.suggest("the king") == suggestions
    restarted.close()
