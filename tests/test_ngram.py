"""The Kneser–Ney baseline: normalisation, hand-checked values, and the metric path."""
import numpy as np
import pytest

from contract.model.metrics import count_hits
from models.ngram import KneserNeyTrigram
from contract.model.text import BOS_ID, EOS_ID, OOV_ID, PAD_ID

A, B, C, D = 4, 5, 6, 7
V = 8

# bos a b c eos / bos a b d eos / bos c b c eos
TINY = np.array([[BOS_ID, A, B, C, EOS_ID],
                 [BOS_ID, A, B, D, EOS_ID],
                 [BOS_ID, C, B, C, EOS_ID]], dtype=np.int32)


def _random_windows(rng, n, length, vocab):
    """Windows shaped like to_sequences output: bos, words, eos, then pad."""
    windows = np.zeros((n, length + 1), np.int32)
    for row in windows:
        words = rng.integers(3, vocab, size=rng.integers(1, length))
        row[:len(words) + 2] = [BOS_ID, *words, EOS_ID]
    return windows


def _p(model, u, v, w):
    """p(w | u, v) read off scores() at position 1 of the window [u, v, w]."""
    return model.scores(np.array([[u, v, w]]))[0, 1, w]


def test_distributions_sum_to_one():
    rng = np.random.default_rng(0)
    vocab = 50
    train = _random_windows(rng, 200, 10, 40)  # ids 40..49 never seen
    model = KneserNeyTrigram(vocab).fit(train)
    queries = {
        "seen contexts": train[:20],
        "unseen trigram and bigram contexts": _random_windows(rng, 20, 10, 40),
        "unseen words": np.array([[BOS_ID, 40, 41, 42], [45, 46, 47, 48]]),
    }
    for name, windows in queries.items():
        probs = model.scores(windows)
        assert np.all(probs > 0), name
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-9, err_msg=name)


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError):
        KneserNeyTrigram(V).fit(np.array([[BOS_ID, V, EOS_ID]]))


def test_unfitted_model_is_uniform():
    probs = KneserNeyTrigram(V).scores(TINY)
    np.testing.assert_allclose(probs, 1.0 / V)


def test_estimated_discounts_by_hand():
    # Trigram counts 2,1,2,1,1,2,1,1,1: n1=6, n2=3. Continuation counts of the
    # 8 bigram types: one 2, seven 1s. N1+(.,w): a 1, b 2, c 2, d 1, eos 2.
    model = KneserNeyTrigram(V).fit(TINY)
    assert model.discounts == pytest.approx((2 / (2 + 2 * 3), 7 / (7 + 2 * 1), 6 / (6 + 2 * 3)))


def test_probabilities_by_hand():
    model = KneserNeyTrigram(V, discount=0.5).fit(TINY)
    d = 0.5
    # N1+(.,w): a 1 (bos), b 2 (a, c), c 2 (bos, b), d 1 (b), eos 2 (c, d); 5 types, total 8.
    p1 = {w: max(n - d, 0) / 8 + d * 5 / 8 / V
          for w, n in {A: 1, B: 2, C: 2, D: 1, EOS_ID: 2, OOV_ID: 0}.items()}
    # After b: c preceded by {a, c}, d by {a}: N1+(.,b,.) = 3, 2 types.
    p2_c_b = (2 - d) / 3 + d * 2 / 3 * p1[C]
    p2_oov_b = d * 2 / 3 * p1[OOV_ID]
    # After c: eos preceded by {b}, b by {bos}: total 2, 2 types.
    p2_eos_c = (1 - d) / 2 + d * 2 / 2 * p1[EOS_ID]
    # c(a, b, .) = 2 over 2 types, c(a, b, c) = 1.
    assert _p(model, A, B, C) == pytest.approx((1 - d) / 2 + d * 2 / 2 * p2_c_b, abs=1e-12)
    assert _p(model, A, B, OOV_ID) == pytest.approx(d * 2 / 2 * p2_oov_b, abs=1e-12)
    # (d, c) never seen as a trigram context: the bigram distribution of c.
    assert _p(model, D, C, EOS_ID) == pytest.approx(p2_eos_c, abs=1e-12)
    # Nothing ever followed eos: the unigram distribution.
    assert _p(model, C, EOS_ID, B) == pytest.approx(p1[B], abs=1e-12)
    # Position 0 has the "no token" left word: (none, bos) saw a twice, c once.
    p2_a_bos = (1 - d) / 2 + d * 2 / 2 * p1[A]
    expected = (2 - d) / 3 + d * 2 / 3 * p2_a_bos
    assert model.scores(np.array([[BOS_ID, A]]))[0, 0, A] == pytest.approx(expected, abs=1e-12)


def test_deterministic_corpus_is_predicted_perfectly_and_pad_is_not_counted():
    sentence = [BOS_ID, A, B, C, D, EOS_ID, PAD_ID, PAD_ID]
    windows = np.array([sentence] * 30, dtype=np.int32)
    model = KneserNeyTrigram(V).fit(windows)
    hits = model.evaluate(windows)
    assert hits.positions == 5 * 30
    assert hits.top1 == hits.top3 == hits.positions


def test_evaluate_matches_count_hits_on_scores():
    rng = np.random.default_rng(1)
    vocab = 30
    train = [_random_windows(rng, 80, 8, vocab) for _ in range(3)]  # per-client list
    held = _random_windows(rng, 60, 8, vocab)
    held[rng.random(held.shape) < 0.05] = OOV_ID
    held[:, 0] = BOS_ID
    model = KneserNeyTrigram(vocab).fit(train)
    expected = count_hits(model.scores(held), held[:, 1:])
    assert model.evaluate(held, chunk=7) == expected
    assert model.evaluate([held[:25], held[25:]]) == expected


def test_oov_targets_are_always_misses():
    # After (bos, a) the only thing ever seen is oov, yet it is never suggested.
    windows = np.array([[BOS_ID, A, OOV_ID, EOS_ID]] * 10, dtype=np.int32)
    model = KneserNeyTrigram(V).fit(windows)
    assert model.scores(windows)[0, 1].argmax() == OOV_ID
    hits = model.evaluate(windows)
    assert (hits.positions, hits.top1, hits.top3) == (30, 20, 20)
