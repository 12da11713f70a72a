"""Public pretraining (models.pretrain, `python -m models pretrain`): trained on public text only,
cached, and accepted as the initial model by the exporter, the server and the simulation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from contract.model.weights import load_checkpoint
from models.central import evaluate
from models.corpus import default_data_dir, load_corpus
from models.model import TINY, weight_layout
from models.pretrain import PretrainConfig, cache_path, pretrain
from models.public_corpus import TEXT_NAME
from models.simulate import initial_weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.corpus


def test_pretraining_learns_from_public_text_and_is_cached(tmp_path, monkeypatch):
    (tmp_path / TEXT_NAME).symlink_to(default_data_dir() / TEXT_NAME)
    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    heldout = np.concatenate(list(corpus.heldout.values()))[:3000]
    cfg = PretrainConfig(epochs=1, batch_size=256, learning_rate=1e-2)
    flat, history = pretrain(TINY, corpus.vocab, cfg, tmp_path)
    assert cache_path(TINY, corpus.vocab, cfg, tmp_path).is_file() and len(history) == 1
    before = evaluate(TINY, initial_weights(TINY), heldout)
    after = evaluate(TINY, flat, heldout)
    assert after.loss < before.loss - 1.0 and after.hits.top1 > before.hits.top1   # the users' text it never saw

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached pretraining trained again")

    monkeypatch.setattr("models.central.train_central", must_not_train)
    again, _ = pretrain(TINY, corpus.vocab, cfg, tmp_path)
    np.testing.assert_array_equal(again, flat)


def test_the_pretrain_command_writes_what_the_exporter_and_server_init_accept(tmp_path):
    out = tmp_path / "pretrained"
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,  # noqa: E731
                                       text=True, timeout=600)
    done = run("-m", "models", "pretrain", "--config", "tiny", "--epochs", "1", "--batch-size", "256",
               "--max-eval-windows", "500", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained (public text only)" in done.stdout
    layout, _, meta = load_checkpoint(out / "pretrained.safetensors")
    assert layout == weight_layout(TINY) and meta["trained_on"] == "public"
    plan = run("-m", "tflite_export", "plan", "--config", "tiny", "--checkpoint", str(out / "pretrained.safetensors"),
               "--out", str(tmp_path / "plan"))
    assert plan.returncode == 0, plan.stderr[-2000:]
    config = tmp_path / "server.json"
    config.write_text('{"database": "state/db.sqlite", "artifact_dir": "state/artifacts", '
                      '"state_dir": "state/private", "populations": {"en": {}}}')
    init = run("-m", "server", "init", "--config", str(config), "--checkpoint", str(out / "pretrained.safetensors"),
               "--vocab", str(out / "vocab.json"), "--plan-dir", str(tmp_path / "plan"))
    assert init.returncode == 0, init.stderr[-2000:]
    bad = run("-m", "models", "pretrain", "--config", "tiny", "--vocabulary", "nope", "--out", str(out))
    assert bad.returncode == 2 and "--vocabulary" in bad.stderr
