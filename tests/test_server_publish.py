"""Publishing with the real exporter: `python -m tflite_export` runs in a child process (the
server never imports TensorFlow), and what apps download verifies as tflite_export's manifest."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server_fixtures import DeviceClient, FlaskTransport, enrollment_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_round_eval_and_publish_with_the_real_exporter(tmp_path):
    from models.model import TINY, build_keras_model, weight_layout
    from contract.model.text import SPECIAL_TOKENS, Vocabulary
    from contract.model.weights import save_checkpoint
    from server import create_app
    from contract.clock import ManualClock
    from server.registration import register_population
    from contract.artifacts.manifest import load_verified

    layout = weight_layout(TINY)
    flat = layout.flatten([w.numpy() for w in build_keras_model(TINY).trainable_weights])
    run = tmp_path / "run"
    save_checkpoint(run / "init.safetensors", layout, flat,
                    {"round": 0, "model_config": dataclasses.asdict(TINY)})
    vocab = Vocabulary(list(SPECIAL_TOKENS) + [f"w{i}" for i in range(TINY.vocab_size - 4)])
    (run / "vocab.json").write_text(vocab.to_json())
    done = subprocess.run([sys.executable, "-m", "tflite_export", "plan", "--checkpoint",
                           str(run / "init.safetensors"), "--out", str(tmp_path / "plan")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    clock = ManualClock()
    population = {"goal": 1, "min_round_size": 1, "over_selection": 1.0, "eval_every": 1, "publish_every": 1,
                  "eligibility": {"min_separation_s": 0.0}}
    app = create_app({"database": str(tmp_path / "db"), "artifact_dir": str(tmp_path / "artifacts"),
                      "state_dir": str(tmp_path / "private"), "tick_interval_s": 0,
                      "populations": {"en": population}}, clock=clock)
    services = app.extensions["nightjar"]
    register_population(services.store, services.artifacts, clock, "en", run / "init.safetensors",
                        plan_dir=tmp_path / "plan")
    transport = FlaskTransport(app.test_client())
    enrollment = enrollment_for(services, "en", clock)
    trainer = DeviceClient(transport, "en", enrollment)
    assignment = trainer.checkin().body["assignment"]
    assert trainer.download(assignment["plan"]["url"]).content[4:8] == b"TFL3"
    delta = np.random.default_rng(0).normal(0, 1e-3, layout.size).astype(np.float32)
    assert trainer.upload(delta, 20).body["status"] == "accepted"
    evaluator = DeviceClient(transport, "en", enrollment)
    assert evaluator.checkin().body["assignment"]["task"] == "eval"
    assert evaluator.evaluate(3, 9, 40).body["status"] == "accepted"

    assert services.publisher.run_pending() == 1          # runs python -m tflite_export app
    published = transport.request("GET", "/v1/populations/en/app-model").body
    assert published["version"] == 1 and published["eval"]["top3"] == pytest.approx(9 / 40)
    download = tmp_path / "phone"
    download.mkdir()
    manifest = transport.request("GET", published["manifest"]["url"]).content
    (download / "app.manifest.json").write_bytes(manifest)
    for name, ref in published["files"].items():
        (download / name).write_bytes(transport.request("GET", ref["url"]).content)
    verified = load_verified(download / "app.manifest.json", kind="app_model")
    assert verified.manifest.model_version == 1 and verified.vocab.sha256 == vocab.sha256
