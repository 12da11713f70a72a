"""The standing canary: every published app model records its first suggestion after fixed probes."""
from __future__ import annotations

import numpy as np

from contract.model.canary import CANARY, changed
from contract.model.text import SPECIAL_TOKENS, Vocabulary, split_sentences


def canary_vocab(size: int) -> Vocabulary:
    words = sorted({w for c in CANARY for w in split_sentences(c)[0]})
    return Vocabulary(list(SPECIAL_TOKENS) + words + [f"w{i}" for i in range(size - 4 - len(words))])


def test_the_exported_app_model_carries_the_canary_that_phones_will_see(tmp_path):
    from contract.artifacts.manifest import read_manifest
    from device_runtime.predictor import Predictor
    from models.model import TINY, build_keras_model, weight_layout
    from tflite_export.export import export_app_model

    vocab = canary_vocab(TINY.vocab_size)
    flat = weight_layout(TINY).flatten([w.numpy() for w in build_keras_model(TINY).trainable_weights])
    flat = flat + np.random.default_rng(0).normal(0, 0.5, flat.shape).astype(np.float32)  # varied answers
    path = export_app_model(TINY, flat, vocab, tmp_path / "app", k=3, model_version=7)
    manifest = read_manifest(path)                          # still a valid manifest, every hash checked
    assert list(manifest.canary) == list(CANARY)
    phone = Predictor()
    assert phone.install(path) == 7
    assert manifest.canary == {c: phone.suggest(c)[0][0] for c in CANARY}
    assert len(set(manifest.canary.values())) > 1           # the probes are not all one answer


def test_a_published_version_names_the_probes_that_changed_since_the_last(make_server):
    env = make_server()
    versions = env.services.versions
    before = {c: "lord" for c in CANARY}
    after = {**before, "the king is": "gold"}
    for version, canary in ((0, before), (0, after)):
        with env.services.store.write() as tx:
            versions.mark_published(tx, "en", version, "a" * 64, canary)
    record = versions.get("en", 0).canary
    assert record == {"suggestions": after, "changed": {"the king is": ["lord", "gold"]}}
    body = env.client.get("/v1/populations/en/versions", headers=env.operator_headers).get_json()
    assert body["versions"][0]["canary"]["changed"] == {"the king is": ["lord", "gold"]}
    assert changed(None, after) == {} and changed(after, after) == {}
