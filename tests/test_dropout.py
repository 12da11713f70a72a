"""Dropout: masks from the session's seed at the configured rate, the plan's only mask inputs, the phone = TFF.

The masks are a LiteRT plan's inputs that a phone draws from its task's seed
(contract.model.dropout); the TFF simulation draws the same ones for the same
seed. tests/test_parity.py checks a whole round through server and phones
with dropout on; here the pieces: the stream, the plan's signatures and
manifest, and one client's update on LiteRT against TFF's.
"""
from __future__ import annotations

import numpy as np
import pytest

from contract.artifacts.errors import SchemaMismatch
from contract.artifacts.manifest import Manifest, read_manifest
from contract.model.dropout import Dropout, keep_masks, parse, session_masks
from models.model import TINY

SHAPE = (16, TINY.seq_len, TINY.embedding_dim)
DROPOUT = Dropout(0.3)


def test_masks_have_the_configured_rate():
    """Each mask's dropped fraction is within 5 binomial standard deviations of the rate; over 200
    seeds the mean is within 5 standard deviations of the mean (a biased stream fails both)."""
    for rate in (0.1, 0.3, 0.5):
        d = Dropout(rate)
        fractions = []
        for seed in range(200):
            for mask in keep_masks(d, seed, 0, *SHAPE):
                assert set(np.unique(mask)) <= {0.0, 1.0} and mask.dtype == np.float32
                fractions.append(1.0 - mask.mean())
        n = np.prod(SHAPE)
        sd = np.sqrt(rate * (1 - rate) / n)
        assert np.all(np.abs(np.array(fractions) - rate) < 5 * sd), (rate, min(fractions), max(fractions))
        assert abs(np.mean(fractions) - rate) < 5 * sd / np.sqrt(len(fractions))


def test_masks_are_unit_wise_independent():
    """No unit, position or row is dropped more often than the rate says (pooled over 400 draws), and the
    two placements' masks are uncorrelated."""
    draws = [keep_masks(DROPOUT, seed, 3, *SHAPE) for seed in range(400)]
    embedding = np.stack([d[0] for d in draws])
    per_unit = 1.0 - embedding.mean(axis=(0, 1, 2))                # [E], each over 400·16·20 draws
    sd = np.sqrt(0.21 / (400 * 16 * 20))
    assert np.all(np.abs(per_unit - 0.3) < 5 * sd)
    both = np.mean([(d[0] == 0) & (d[1] == 0) for d in draws[:50]])
    assert abs(both - 0.09) < 5 * np.sqrt(0.09 * 0.91 / (50 * np.prod(SHAPE)))


def test_masks_are_a_function_of_seed_and_step():
    a = keep_masks(DROPOUT, 7, 2, *SHAPE)
    np.testing.assert_array_equal(a[0], keep_masks(DROPOUT, 7, 2, *SHAPE)[0])   # same seed, same step
    for other in (keep_masks(DROPOUT, 8, 2, *SHAPE), keep_masks(DROPOUT, 7, 3, *SHAPE)):
        assert (a[0] != other[0]).mean() > 0.3                    # ≈ 2·0.3·0.7 = 0.42 of units differ
    assert (a[0] != a[1]).mean() > 0.3                            # the placements draw apart
    # a short last batch draws its own rows: the first rows of a full draw, as the simulation stacks them
    short = keep_masks(DROPOUT, 7, 2, 5, TINY.seq_len, TINY.embedding_dim)
    np.testing.assert_array_equal(short[0], a[0][:5])


def test_session_masks_stack_every_step():
    stacked = session_masks(DROPOUT, 11, [16, 16, 4], TINY.seq_len, TINY.embedding_dim)
    assert stacked[0].shape == (36, TINY.seq_len, TINY.embedding_dim) and stacked[0].dtype == np.uint8
    np.testing.assert_array_equal(stacked[1][16:32], keep_masks(DROPOUT, 11, 1, *SHAPE)[1])
    np.testing.assert_array_equal(stacked[0][32:], keep_masks(DROPOUT, 11, 2, 4, *SHAPE[1:])[0])


@pytest.mark.parametrize("rate,placement,message", [
    (0.0, "embedding", "rate"), (1.0, "embedding", "rate"), (0.3, "", "placement"),
    (0.3, "embedding,embedding", "placement"), (0.3, "softmax", "placement"),
    (0.3, "projection,embedding", "order")])
def test_bad_dropout_options_are_refused(rate, placement, message):
    with pytest.raises(ValueError, match=message):
        Dropout(rate, tuple(p for p in placement.split(",") if p)).validate()
    assert parse(0.0) is None


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The seeded TINY model's plan with and without dropout, and its app model."""
    from emulation.models import tiny_corpus
    from models.simulate import initial_weights
    from tflite_export import export_app_model, export_plan
    from tflite_export.reader import load_app_model, load_plan

    corpus = tiny_corpus()
    config = TINY.with_vocab(len(corpus.vocab))
    flat = initial_weights(config)
    root = tmp_path_factory.mktemp("plans")
    with_dropout = load_plan(export_plan(config, flat, corpus.vocab, root / "dropout", dropout=DROPOUT))
    without = load_plan(export_plan(config, flat, corpus.vocab, root / "plain"))
    app = load_app_model(export_app_model(config, flat, corpus.vocab, root / "app"))
    return corpus, config, flat, with_dropout, without, app


def test_only_the_train_signature_takes_masks(plans):
    corpus, config, flat, with_dropout, without, app = plans
    sigs = with_dropout.manifest.signatures
    mask = {"shape": [16, config.seq_len, config.embedding_dim], "dtype": "float32"}
    assert {k: v for k, v in sigs["train"]["inputs"].items() if k.startswith("keep")} == {
        "keep_embedding": mask, "keep_projection": mask}
    for name in sigs:
        if name != "train":
            assert sigs[name] == without.manifest.signatures[name], name      # no mask anywhere else
    assert not [i for s in app.manifest.signatures.values() for i in s["inputs"] if "keep" in i]
    assert with_dropout.manifest.dropout == {"rate": 0.3, "placement": ["embedding", "projection"]}
    assert without.manifest.dropout is None and "dropout" not in without.manifest.to_json()
    # inference with a dropout plan is the whole network: the same logits and distribution as without
    windows = corpus.heldout[sorted(corpus.heldout)[0]][:3]
    np.testing.assert_array_equal(with_dropout.infer(windows[:, :-1]), without.infer(windows[:, :-1]))
    np.testing.assert_array_equal(with_dropout.next_probs([2, 5, 6]), without.next_probs([2, 5, 6]))


def test_the_plan_needs_its_masks_and_checks_them(plans):
    corpus, config, flat, with_dropout, without, _ = plans
    batch = corpus.train[sorted(corpus.train)[0]][:4]
    masks = keep_masks(DROPOUT, 0, 0, 4, config.seq_len, config.embedding_dim)
    with pytest.raises(ValueError, match="2 mask"):
        with_dropout.train_windows(batch, 0.1)
    with pytest.raises(ValueError, match="0 mask"):
        without.train_windows(batch, 0.1, masks)
    with pytest.raises(ValueError, match="keep_embedding"):
        with_dropout.train_windows(batch, 0.1, [masks[0] * 2, masks[1]])
    with pytest.raises(ValueError, match="keep_projection"):
        with_dropout.train_windows(batch, 0.1, [masks[0], masks[1][:3]])
    with_dropout.set_weights(flat)


def test_a_manifest_with_a_bad_dropout_is_refused(plans):
    path = plans[3].source
    good = read_manifest(path).to_json()
    assert Manifest.from_json(good).training_dropout == DROPOUT
    for bad in ('{"rate": 1.5, "placement": ["embedding"]}', '{"rate": 0.3}', '"0.3"',
                '{"rate": 0.3, "placement": ["recurrent"]}'):
        text = good.replace('"dropout": {\n    "rate": 0.3,\n    "placement": [\n      "embedding",\n'
                            '      "projection"\n    ]\n  }', f'"dropout": {bad}')
        assert text != good
        with pytest.raises(SchemaMismatch, match="dropout"):
            Manifest.from_json(text)


@pytest.mark.slow
def test_a_phone_update_with_dropout_equals_the_tff_client_update(plans):
    """One client, two epochs: LiteRT with the masks the phone draws = TFF with the masks the simulation
    draws, for the same seed; another seed gives another update (the masks are not ignored)."""
    from contract.update.spec import UpdateSpec
    from device_runtime.training import Hyperparameters, train_locally
    from models.fedavg import FederatedAveraging, client_optimizer
    from models.simulate import client_dataset, server_optimizer
    from models.tff_runtime import tff_session

    corpus, config, flat, with_dropout, _, _ = plans
    windows = max(corpus.train.values(), key=len)
    phone = {seed: train_locally(with_dropout, flat, windows, Hyperparameters(0.5, 2, 16, seed)).delta
             for seed in (12345, 777)}
    with tff_session():
        process = FederatedAveraging(config, client_optimizer(0.5, None), server_optimizer("sgd", 1.0),
                                     UpdateSpec(bits=32), 0, None, DROPOUT)
        data = client_dataset(windows, 16, 2, 12345, None, DROPOUT, config.embedding_dim)
        simulated = process.next(flat, [data], [12345], 1).weights - flat
    assert np.abs(phone[12345]).max() > 0.05
    assert np.abs(phone[12345] - simulated).max() < 1e-6
    assert np.abs(phone[777] - simulated).max() > 1e-3
