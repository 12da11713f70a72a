"""The CIFG model, its masked loss and the suggestion metric."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from contract.model.metrics import Hits, count_hits, suggestions
from models.model import (GBOARD, TINY, SuggestionRecall, build_keras_model,
                          masked_cross_entropy, parameter_count, suggestion_hits,
                          weight_layout)
from contract.model.text import BOS_ID, EOS_ID, OOV_ID, PAD_ID


def test_gboard_config_has_about_1_4m_parameters():
    n = parameter_count(GBOARD)
    assert 1_350_000 <= n <= 1_450_000
    assert build_keras_model(GBOARD).count_params() == n == weight_layout(GBOARD).size


def test_keras_weights_follow_the_layout_order():
    model = build_keras_model(TINY)
    names = [w.name.split("/", 1)[1].rsplit(":", 1)[0] for w in model.trainable_weights]
    assert names == weight_layout(TINY).names
    assert [tuple(w.shape) for w in model.trainable_weights] == [
        e.shape for e in weight_layout(TINY).entries]


def test_output_is_tied_to_the_input_embedding():
    model = build_keras_model(TINY)
    x = np.array([[5] * TINY.seq_len], np.int32)
    emb = model.trainable_weights[0]
    before = model(x).numpy()
    emb.assign(emb * 2.0)          # changes the input *and* the output projection
    bias = model.trainable_weights[-1].numpy()
    after = model(x).numpy()
    assert not np.allclose(before, after)
    assert before.shape == (1, TINY.seq_len, TINY.vocab_size)
    assert np.all(bias == 0)


def numpy_masked_ce(targets, logits):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = targets != PAD_ID
    return (nll * mask).sum() / max(mask.sum(), 1)


def test_masked_loss_equals_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 11)).astype(np.float32) * 3
    targets = rng.integers(1, 11, size=(4, 6)).astype(np.int32)
    targets[0, 3:] = PAD_ID
    targets[2, :] = PAD_ID
    got = float(masked_cross_entropy(tf.constant(targets), tf.constant(logits)))
    assert got == pytest.approx(numpy_masked_ce(targets, logits), rel=1e-5)
    # Pad positions carry no loss: changing their logits changes nothing.
    logits2 = logits.copy()
    logits2[2] = 100.0
    assert float(masked_cross_entropy(tf.constant(targets), tf.constant(logits2))) == pytest.approx(got, rel=1e-6)


def test_masked_loss_of_an_all_pad_batch_is_zero():
    targets = np.zeros((2, 3), np.int32)
    assert float(masked_cross_entropy(tf.constant(targets), tf.ones((2, 3, 7)))) == 0.0


def test_suggestions_never_include_pad_bos_oov():
    scores = np.array([[9.0, 8.0, 1.0, 7.0, 0.5, 2.0, 3.0]])  # pad, bos, eos, oov, 4, 5, 6
    assert suggestions(scores, k=3).tolist() == [[6, 5, EOS_ID]]


def test_metric_definition_on_hand_made_examples():
    # vocab of 7: pad, bos, eos, oov, w4, w5, w6. Scores rank w6 > w5 > eos > w4.
    s = np.array([0.0, 50.0, 3.0, 60.0, 1.0, 4.0, 5.0])
    scores = np.tile(s, (1, 5, 1))
    targets = np.array([[6, 5, EOS_ID, OOV_ID, PAD_ID]])
    hits = count_hits(scores, targets)
    # w6 is top-1; w5 and eos are in the top 3; oov is never suggested; pad is not counted.
    assert hits == Hits(top1=1, top3=3, positions=4)
    assert hits.as_dict()["top1"] == 0.25 and hits.as_dict()["top3"] == 0.75
    # ties go to the lower id
    assert suggestions(np.array([[0, 0, 1.0, 0, 1.0, 1.0, 0]]), k=2).tolist() == [[EOS_ID, 4]]


def test_tensorflow_metric_agrees_with_numpy_definition():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 5, 13)).astype(np.float32)
    logits[..., BOS_ID] += 3  # tempt the metric with banned tokens
    logits[..., OOV_ID] += 3
    logits[:4] = np.round(logits[:4])  # ties, which go to the lower id
    targets = rng.integers(0, 13, size=(8, 5)).astype(np.int32)
    expected = count_hits(logits, targets)
    for k, want in ((1, expected.top1), (3, expected.top3)):
        m = SuggestionRecall(k)
        m.update_state(tf.constant(targets), tf.constant(logits))
        assert float(m.result()) == pytest.approx(want / expected.positions, rel=1e-6)
        mask = targets != PAD_ID
        assert float(tf.reduce_sum(suggestion_hits(targets, logits, k) * mask)) == want
